"""TraceIndex: memory-mapped, read-only queries over a built index; every shard in one compiled call.

Spans are sequences (or 1-D arrays) of token ids; batched forms take lists of spans (or a 2-D int
array of equal-length spans) and run in one compiled call, split over a thread pool once a batch
has >= ``PARALLEL_MIN_QUERIES`` items. A span with a
token outside ``[0, vocab_size)`` never occurs (count 0). The empty span occurs at every token
position (count = ``num_tokens``), the infini-gram convention. Positions are token offsets.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np

from tracealign_jax.atomic_io import IntegrityError, manifest_hash, remember_verified, verify_manifest, verify_manifest_cached
from tracealign_jax.index import format as fmt
from tracealign_jax.index.interleaved_search import count_batch_sorted, gather_positions, ranges_batch, search_keys
from tracealign_jax.index.match_spans import longest_batch, longest_slice, maximal_batch, maximal_slice
from tracealign_jax.index.next_tokens import next_counts_one, next_runs_fill
from tracealign_jax.index.search_primitives import build_fence
from tracealign_jax.index.single_search import count_one

SpanLike = Sequence[int] | np.ndarray

# Below this many queries a batch runs on the calling thread; above, in chunks on a thread pool
# (the kernels release the GIL). Thread hand-off costs tens of microseconds.
PARALLEL_MIN_QUERIES = 256
# A single query at least this long has its positions split across the pool (longest / maximal).
SPLIT_MIN_TOKENS = 128
# Batched next-token counts fill a buffer of at most this many (token, count) entries at a time.
NEXT_BUFFER_ENTRIES = 1 << 22
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count(), thread_name_prefix="traceindex")
    return _POOL


def _chunked(n: int, call: Callable[[int, int], Any], min_items: int = PARALLEL_MIN_QUERIES) -> list[Any]:
    """``[call(a, b), ...]`` over consecutive item ranges covering [0, n), in order."""
    bounds = _chunk_bounds(n, min_items)
    if len(bounds) == 1:
        return [call(0, n)]
    return list(_pool().map(lambda ab: call(*ab), bounds))


def _chunk_bounds(n: int, min_items: int = PARALLEL_MIN_QUERIES) -> list[tuple[int, int]]:
    threads = os.cpu_count() or 1
    if n < min_items or threads == 1:
        return [(0, n)]
    edges = np.linspace(0, n, 2 * threads + 1).astype(np.int64).tolist()  # 2 chunks per thread: uneven work
    return list(zip(edges[:-1], edges[1:]))


def _search_order(flat: np.ndarray, offsets: np.ndarray, vocab_size: int) -> np.ndarray:
    """A visiting order for a batch: within each chunk of ``_chunked``, queries sorted on their first
    tokens (``search_keys``), so consecutive binary searches walk the same (cached) suffix-array
    paths and repeated queries are adjacent. Returns chunk-local permutations, concatenated."""
    n = len(offsets) - 1
    if n < 64:
        return np.arange(n, dtype=np.int64)
    keys = search_keys(flat, offsets, vocab_size)
    order = np.empty(n, np.int64)
    for a, b in _chunk_bounds(n):
        order[a:b] = a + np.argsort(keys[a:b])
    return order


class Span(NamedTuple):
    """A maximal matching span ``tokens[start:end]`` (end exclusive) of a query.

    count: corpus occurrences; unigram_logprob: sum of log P_train(t) over the span, nats."""

    start: int
    end: int
    count: int
    unigram_logprob: float


@dataclass(frozen=True)
class _Arrays:
    """What the kernels see (see ``search_primitives.py``)."""

    tokens: np.ndarray
    sa_u8: np.ndarray
    bits: int
    shard_starts_S1: np.ndarray
    bucket_SxV2: np.ndarray  # int64[S, V+2]: start of each first token's block in each shard's SA
    fence_F: np.ndarray  # uint64: tokens 2-3 of every 32nd suffix (``build_fence``), derived at open
    doc_starts_D1: np.ndarray
    sep: int


def _buckets(counts_SxV1: np.ndarray, starts_S1: np.ndarray, path: Path) -> np.ndarray:
    """First-token block starts (int64[S, V+2]) from the per-shard counts, checked against the
    shard sizes: the kernels index the suffix array with them unchecked."""
    bucket = np.zeros((counts_SxV1.shape[0], counts_SxV1.shape[1] + 1), np.int64)
    np.cumsum(counts_SxV1, axis=1, out=bucket[:, 1:])
    if (counts_SxV1 < 0).any() or not np.array_equal(bucket[:, -1], np.diff(starts_S1)):
        raise IntegrityError(f"{path / fmt.SHARD_COUNTS_FILE}: token counts do not add up to the shard sizes "
                             f"(corrupted)")
    return bucket


def _flatten(spans: Sequence[SpanLike] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates spans into (q_flat int64, q_offsets_N1 int64); the kernels skip a span with a
    token outside the vocabulary (it never occurs).

    ``spans`` is a list of int sequences / 1-D arrays, or a 2-D int array of N equal-length spans."""
    if isinstance(spans, np.ndarray) and spans.ndim == 2:
        n, length = spans.shape
        flat = np.ascontiguousarray(spans, dtype=np.int64).reshape(-1)
        lengths = np.full(n, length, np.int64)
    else:
        lengths = np.fromiter(map(len, spans), np.int64, count=len(spans))
        flat = np.concatenate(spans, dtype=np.int64, casting="unsafe") if len(spans) else np.zeros(0, np.int64)
        if flat.ndim != 1 or len(flat) != lengths.sum():
            raise ValueError("spans must be 1-D sequences of token ids")
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return flat, offsets


class TraceIndex:
    """A read-only, memory-mapped suffix-array index (see ``format.py`` for the files).

    Attributes: ``vocab_size, num_tokens, num_docs, num_shards, manifest, manifest_hash``,
    ``tokenizer_dir`` (Path of the bundled tokenizer, or None), ``path``."""

    def __init__(self, path: Path, manifest: dict[str, Any], layout: fmt.Layout):
        self.path = path
        self.manifest = manifest
        self.manifest_hash = manifest_hash(manifest)
        self.vocab_size = layout.vocab_size
        self.num_tokens = layout.num_tokens
        self.num_docs = layout.num_docs
        self.num_shards = layout.num_shards
        self.tokenizer_name = manifest.get("tokenizer_name", "none")
        self.tokenizer_hash = manifest.get("tokenizer_hash", "none")
        tok_dir = path / fmt.TOKENIZER_DIR
        self.tokenizer_dir: Path | None = tok_dir if tok_dir.is_dir() else None
        starts = np.asarray(layout.shard_starts, np.int64)
        counts = fmt.memmap(path / fmt.SHARD_COUNTS_FILE, "<i4", layout.num_shards * (layout.vocab_size + 1))
        counts_SxV1 = counts.reshape(layout.num_shards, layout.vocab_size + 1)
        tokens = fmt.memmap(path / fmt.TOKENS_FILE, layout.dtype, layout.num_positions)
        sa_u8 = fmt.memmap(path / fmt.SA_FILE, np.uint8, fmt.sa_bytes(layout.num_positions, layout.sa_bits))
        self._a = _Arrays(
            tokens=tokens,
            sa_u8=sa_u8,
            bits=layout.sa_bits,
            shard_starts_S1=starts,
            bucket_SxV2=_buckets(counts_SxV1, starts, path),
            fence_F=build_fence(tokens, sa_u8, layout.sa_bits, starts),
            doc_starts_D1=fmt.memmap(path / fmt.DOC_STARTS_FILE, "<i8", layout.num_docs + 1),
            sep=layout.vocab_size,
        )
        # what every search kernel takes first (see search_primitives.py), in that order
        self._k = (tokens, sa_u8, layout.sa_bits, starts, self._a.bucket_SxV2, self._a.fence_F)
        self._unigram_counts = counts_SxV1[:, :-1].sum(axis=0, dtype=np.int64)
        self._logprobs_V: np.ndarray | None = None
        self._meta_table = None
        self._risk_D: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path, *, expected_tokenizer_hash: str | None = None,
             verify: Literal["auto", "size", "full"] = "auto") -> "TraceIndex":
        """Opens an index, checking the manifest: every file present with its size ("size"), also its
        SHA-256 ("full"), or SHA-256 of the files changed since they were last verified or built
        ("auto", the default: see ``atomic_io.verify_manifest_cached``; ``tracealign index verify``
        runs "full"). A tokenizer hash other than ``expected_tokenizer_hash`` is refused.
        Raises IntegrityError naming the file and the reason."""
        path = Path(path)
        if verify not in ("auto", "size", "full"):
            raise ValueError(f"verify must be 'auto', 'size' or 'full', got {verify!r}")
        if verify == "auto":
            manifest = verify_manifest_cached(path)
        else:
            manifest = verify_manifest(path, checksums=verify == "full")
            if verify == "full":
                remember_verified(path, manifest)
        layout = fmt.layout_from_manifest(manifest, path)
        if expected_tokenizer_hash is not None and manifest.get("tokenizer_hash") != expected_tokenizer_hash:
            raise IntegrityError(
                f"{path / 'manifest.json'}: index was built with tokenizer {manifest.get('tokenizer_name')!r} "
                f"(hash {manifest.get('tokenizer_hash')}), the caller's tokenizer has hash {expected_tokenizer_hash}")
        return cls(path, manifest, layout)

    def __repr__(self) -> str:
        return (f"TraceIndex({str(self.path)!r}, tokens={self.num_tokens}, docs={self.num_docs}, "
                f"shards={self.num_shards}, vocab={self.vocab_size})")

    # ---- counting -----------------------------------------------------------------------------

    def count(self, span: SpanLike) -> int:
        """Number of occurrences of ``span`` in the corpus (never across documents)."""
        q = np.asarray(span, dtype=np.int64).reshape(-1)
        return int(count_one(*self._k, q))

    def count_batch(self, spans: Sequence[SpanLike]) -> np.ndarray:
        """int64[N] counts of N spans. A large batch is cut into chunks: while a worker thread sorts
        and searches one chunk in a compiled call, this thread converts the next one to arrays."""
        n = len(spans)

        def run(flat: np.ndarray, offsets: np.ndarray) -> np.ndarray:
            return count_batch_sorted(*self._k, flat, offsets)

        bounds = _chunk_bounds(n)
        if len(bounds) == 1:
            return run(*_flatten(spans))
        pool = _pool()
        return np.concatenate([f.result() for f in [pool.submit(run, *_flatten(spans[i:j])) for i, j in bounds]])

    def _ranges(self, spans: Sequence[SpanLike]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per span and shard the SA range [lo, hi), plus the spans' offsets into their flat array."""
        flat, offsets = _flatten(spans)
        order = _search_order(flat, offsets, self.vocab_size)
        parts = _chunked(len(offsets) - 1, lambda i, j: ranges_batch(
            *self._k, flat, offsets[i:j + 1], order[i:j] - i))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), offsets

    def _gather(self, lo_NxS: np.ndarray, hi_NxS: np.ndarray, take_N: np.ndarray, seed: int,
                want_offsets: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out_offsets = np.zeros(len(take_N) + 1, np.int64)
        np.cumsum(take_N, out=out_offsets[1:])
        seed_frac = float(np.random.default_rng(seed).random()) if seed else 0.0
        a = self._a
        take_N = take_N.astype(np.int64)
        parts = _chunked(len(take_N), lambda i, j: gather_positions(
            a.sa_u8, a.bits, a.shard_starts_S1, a.doc_starts_D1, lo_NxS[i:j], hi_NxS[i:j], take_N[i:j], seed_frac,
            out_offsets[i:j + 1], want_offsets))
        return out_offsets, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ---- occurrences --------------------------------------------------------------------------

    def locate_batch(self, spans: Sequence[SpanLike], limit: int) -> list[list[tuple[int, int]]]:
        """For each span, up to ``limit`` occurrences as (doc_id, offset_in_doc), sorted."""
        lo, hi, _ = self._ranges(spans)
        take = np.minimum((hi - lo).sum(axis=1), max(int(limit), 0))
        out_offsets, docs, offs = self._gather(lo, hi, take, 0, True)
        result = []
        for i in range(len(take)):
            d, o = docs[out_offsets[i]:out_offsets[i + 1]], offs[out_offsets[i]:out_offsets[i + 1]]
            order = np.lexsort((o, d))
            result.append(list(zip(d[order].tolist(), o[order].tolist())))
        return result

    def locate(self, span: SpanLike, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` occurrences of ``span`` as (doc_id, offset_in_doc), sorted; metadata of the
        documents via ``doc_metadata``."""
        return self.locate_batch([span], limit)[0]

    def occurrence_docs_batch(self, spans: Sequence[SpanLike], max_samples: int, seed: int = 0
                              ) -> list[tuple[np.ndarray, int]]:
        """Per span ``(doc_ids int64[k], total_count)``: every occurrence's doc id (one per occurrence,
        ascending) when total <= max_samples, else a deterministic stratified sample of
        ``max_samples`` ranks of the suffix-array range (the same for the same seed)."""
        lo, hi, _ = self._ranges(spans)
        totals = (hi - lo).sum(axis=1)
        take = np.minimum(totals, max(int(max_samples), 0))
        out_offsets, docs, _ = self._gather(lo, hi, take, seed, False)
        result = []
        for i in range(len(take)):
            d = docs[out_offsets[i]:out_offsets[i + 1]]
            result.append((np.sort(d) if take[i] == totals[i] else d, int(totals[i])))
        return result

    def occurrence_docs(self, span: SpanLike, max_samples: int, seed: int = 0) -> tuple[np.ndarray, int]:
        return self.occurrence_docs_batch([span], max_samples, seed)[0]

    # ---- matching a generation ----------------------------------------------------------------

    def longest_matches_batch(self, token_lists: Sequence[SpanLike]) -> list[np.ndarray]:
        """For each token list, int32[L]: length of the longest corpus match starting at each position."""
        flat, offsets = _flatten(token_lists)
        out = np.concatenate(_chunked(len(offsets) - 1, lambda i, j: longest_batch(
            *self._k, flat, offsets[i:j + 1])))
        return [out[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]

    def longest_matches(self, tokens: SpanLike) -> np.ndarray:
        q = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(q) < SPLIT_MIN_TOKENS:
            return self.longest_matches_batch([q])[0]
        return self._longest_split(q).astype(np.int32)

    def _longest_split(self, q: np.ndarray) -> np.ndarray:
        """One long query's positions split across the thread pool (int64[L])."""
        return np.concatenate(_chunked(len(q), lambda i, j: longest_slice(
            *self._k, q, i, j), min_items=SPLIT_MIN_TOKENS))

    def maximal_spans_batch(self, token_lists: Sequence[SpanLike], min_len: int = 1,
                            max_count: int | None = None) -> list[list[Span]]:
        """Maximal matching spans (not contained in another matching span) of each token list with
        length >= min_len and, if given, count <= max_count; ranked by span unigram log-prob,
        rarest (most negative) first, ties by start."""
        flat, offsets = _flatten(token_lists)
        logp_V = self.unigram_logprobs()
        parts = _chunked(len(offsets) - 1, lambda i, j: maximal_batch(
            *self._k, flat, offsets[i:j + 1],
            max(int(min_len), 1), logp_V))
        span_len, span_count, span_logp = (np.concatenate([p[k] for p in parts]) for k in range(3))
        return [self._rank_spans(span_len[s0:s1], span_count[s0:s1], span_logp[s0:s1], max_count)
                for s0, s1 in zip(offsets[:-1], offsets[1:])]

    def maximal_spans(self, tokens: SpanLike, min_len: int = 1, max_count: int | None = None) -> list[Span]:
        q = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(q) < SPLIT_MIN_TOKENS:
            return self.maximal_spans_batch([q], min_len, max_count)[0]
        longest_L = self._longest_split(q)
        parts = _chunked(len(q), lambda i, j: maximal_slice(
            *self._k, q, longest_L, i, j, max(int(min_len), 1),
            self.unigram_logprobs()), min_items=SPLIT_MIN_TOKENS)
        span_len, span_count, span_logp = (np.concatenate([p[k] for p in parts]) for k in range(3))
        return self._rank_spans(span_len, span_count, span_logp, max_count)

    @staticmethod
    def _rank_spans(span_len: np.ndarray, span_count: np.ndarray, span_logp: np.ndarray,
                    max_count: int | None) -> list[Span]:
        starts = np.flatnonzero(span_len)
        lens, counts, logps = span_len[starts], span_count[starts], span_logp[starts]
        if max_count is not None:
            keep = counts <= max_count
            starts, lens, counts, logps = starts[keep], lens[keep], counts[keep], logps[keep]
        # rounded so that near-equal sums of different tokens still order by start
        order = np.lexsort((starts, np.round(logps, 9)))
        return [Span(*t) for t in zip(starts[order].tolist(), (starts + lens)[order].tolist(),
                                      counts[order].tolist(), logps[order].tolist())]

    def next_token_counts_batch(self, contexts: Sequence[SpanLike]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Exact counts of every token that follows each context in the corpus (no sampling):
        per context ``(token_ids int64[M] ascending, counts int64[M])``; document ends are not tokens."""
        lo, hi, offsets = self._ranges(contexts)
        a = self._a
        # one pass into a buffer sized by the most runs a context can have (range size, at most V per
        # shard), in groups of <= NEXT_BUFFER_ENTRIES so a batch of frequent contexts stays bounded
        cap_N = np.minimum(hi - lo, self.vocab_size).sum(axis=1)
        csum = np.cumsum(cap_N)
        result: list[tuple[np.ndarray, np.ndarray]] = []
        g0 = 0
        while g0 < len(cap_N):
            before = csum[g0 - 1] if g0 else 0
            g1 = max(g0 + 1, int(np.searchsorted(csum, before + NEXT_BUFFER_ENTRIES, side="right")))
            cap = np.zeros(g1 - g0 + 1, np.int64)
            np.cumsum(cap_N[g0:g1], out=cap[1:])
            parts = _chunked(g1 - g0, lambda i, j: next_runs_fill(
                a.tokens, a.sa_u8, a.bits, a.shard_starts_S1, a.sep, offsets[g0 + i:g0 + j + 1], lo[g0 + i:g0 + j],
                hi[g0 + i:g0 + j], cap[i:j + 1]))
            tok, cnt, distinct = (np.concatenate([p[k] for p in parts]) for k in range(3))
            result.extend((tok[c:c + d].copy(), cnt[c:c + d].copy())
                          for c, d in zip(cap[:-1].tolist(), distinct.tolist()))
            g0 = g1
        return result

    def next_token_counts(self, context: SpanLike) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(context, dtype=np.int64).reshape(-1)
        return next_counts_one(*self._k, q)

    # ---- corpus statistics and documents ------------------------------------------------------

    def unigram_counts(self) -> np.ndarray:
        """int64[V] corpus count of each token."""
        return self._unigram_counts

    def unigram_logprobs(self) -> np.ndarray:
        """float64[V] log P_train(t) in nats, add-0.5 smoothed: log((c_t + 0.5) / (N + 0.5 V))."""
        if self._logprobs_V is None:
            c = self._unigram_counts.astype(np.float64)
            self._logprobs_V = np.log(c + 0.5) - np.log(self.num_tokens + 0.5 * self.vocab_size)
        return self._logprobs_V

    def _table(self):
        if self._meta_table is None:
            import pyarrow.parquet as pq

            self._meta_table = pq.read_table(self.path / fmt.METADATA_FILE, memory_map=True)
            if self._meta_table.num_rows != self.num_docs:
                raise IntegrityError(f"{self.path / fmt.METADATA_FILE}: {self._meta_table.num_rows} rows for "
                                     f"{self.num_docs} documents")
        return self._meta_table

    def _check_docs(self, doc_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_docs):
            raise IndexError(f"doc ids must lie in [0, {self.num_docs}), got [{ids.min()}, {ids.max()}]")
        return ids

    def doc_metadata(self, doc_ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """The record metadata of each document, plus ``doc_id``, ``risk`` and ``category``."""
        ids = self._check_docs(doc_ids)
        rows = self._table().take(ids).to_pydict()
        return [dict(json.loads(m), doc_id=int(d), risk=r, category=c)
                for d, r, c, m in zip(ids, rows["risk"], rows["category"], rows["meta_json"])]

    def doc_unsafe(self, doc_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float64[k] risk in [0, 1] of each document (``unsafe`` labels read as 0 / 1)."""
        if self._risk_D is None:
            self._risk_D = self._table().column("risk").to_numpy()
        return self._risk_D[self._check_docs(doc_ids)]

    def doc_tokens(self, doc_id: int) -> np.ndarray:
        """The token ids of one document (a read-only view into the memory map)."""
        d = int(self._check_docs([doc_id])[0])
        s = self._a.doc_starts_D1
        return self._a.tokens[s[d]:s[d + 1] - 1]

    def iter_doc_tokens(self, unsafe_only: bool = False, min_risk: float = 0.5) -> Iterator[tuple[int, np.ndarray]]:
        """Yields ``(doc_id, tokens)`` for every document, or only those with risk >= min_risk."""
        ids = np.arange(self.num_docs)
        if unsafe_only:
            ids = ids[self.doc_unsafe(ids) >= min_risk]
        s = self._a.doc_starts_D1
        for d in ids.tolist():
            yield d, self._a.tokens[s[d]:s[d + 1] - 1]
