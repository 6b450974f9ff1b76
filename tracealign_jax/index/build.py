"""Builds a TraceIndex from token ids: separators, shards sorted in parallel threads, packed SA, manifest.

``build_index_from_tokens`` is the core (tests and synthetic corpora call it directly);
``build_index`` in ``corpus.py`` tokenizes JSONL/Parquet records first and then calls ``write_index``.
Everything is written inside ``atomic_directory``: a crashed build leaves no half index that loads.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydivsufsort.dll import libdivsufsort, libdivsufsort64
from tqdm.auto import tqdm

from tracealign_jax.atomic_io import atomic_directory, remember_verified, write_manifest
from tracealign_jax.index import format as fmt
from tracealign_jax.index.sa_packing import encode_bytes, pack_suffix_array, shard_counts, write_entries

# Below this many positions one shard is sorted on one thread: splitting a small corpus only adds a
# binary search per shard to every query.
MIN_PARALLEL_SHARD = 1 << 21


def policy_risk(meta: dict[str, Any]) -> float:
    """Risk in [0, 1] from a record's policy label: ``unsafe: bool`` -> 0/1, or ``risk`` as given.

    Raises KeyError/TypeError/ValueError with the field name; callers add file + line or doc index."""
    if "risk" in meta and meta["risk"] is not None:
        risk = meta["risk"]
        if isinstance(risk, bool) or not isinstance(risk, (int, float)):
            raise TypeError(f"risk: expected a number in [0, 1], got {type(risk).__name__}")
        if not 0.0 <= float(risk) <= 1.0:
            raise ValueError(f"risk: {risk} is outside [0, 1]")
        return float(risk)
    if "unsafe" in meta and meta["unsafe"] is not None:
        if not isinstance(meta["unsafe"], (bool, np.bool_)):
            raise TypeError(f"unsafe: expected bool, got {type(meta['unsafe']).__name__}")
        return 1.0 if meta["unsafe"] else 0.0
    raise KeyError("unsafe/risk: missing policy label (give `unsafe: bool` or `risk` in [0, 1])")


def plan_shards(doc_starts_D1: np.ndarray, shard_tokens: int | None, threads: int) -> np.ndarray:
    """Shard boundaries (positions, int64[S+1]) at document boundaries, each shard < 2^31 positions.

    ``shard_tokens=None`` picks one shard per thread once the corpus is large enough to profit."""
    n = int(doc_starts_D1[-1])
    if shard_tokens is None:
        shard_tokens = n if n < 2 * MIN_PARALLEL_SHARD else math.ceil(n / max(1, threads))
    shard_tokens = int(min(max(shard_tokens, 1), fmt.MAX_SHARD_POSITIONS))
    bounds = [0]
    while bounds[-1] < n:
        # the last document start at or before the target; at least one document per shard
        target = bounds[-1] + shard_tokens
        j = int(np.searchsorted(doc_starts_D1, target, side="right")) - 1
        nxt = int(doc_starts_D1[j]) if target < n else n
        if nxt <= bounds[-1]:
            nxt = int(doc_starts_D1[np.searchsorted(doc_starts_D1, bounds[-1], side="right")])
        if nxt - bounds[-1] > fmt.MAX_SHARD_POSITIONS:
            raise ValueError(f"a document starting at position {bounds[-1]} makes a shard of {nxt - bounds[-1]} "
                             f"positions, over the 2^31 suffix-array limit")
        bounds.append(nxt)
    return np.asarray(bounds, np.int64)


def alphabetic_code(counts_V1: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """An order-preserving prefix code of the ids 0..V (V + 1 <= 65536) into one or two bytes:
    ``(first_b int64[V+1], second_b int64[V+1], -1 for one-byte codes)``, or None if V + 1 > 65536.

    The most frequent ids get a first byte of their own; every other id shares its first byte with
    up to 255 id-neighbours and adds a second byte. Byte strings then sort exactly as the id
    strings they code (the first bytes increase with the id, and no code is a prefix of another),
    so sorting the coded text sorts the shard. On a Zipf corpus it is shorter than 2 bytes per token,
    and libdivsufsort sorts it faster than the big-endian 16-bit text."""
    n_sym = len(counts_V1)
    if n_sym > 1 << 16:
        return None
    by_count = np.argsort(-counts_V1, kind="stable")

    def first_bytes(k: int) -> int:  # one-byte ids + blocks of <= 256 ids for the runs between them
        gaps = np.diff(np.concatenate(([-1], np.sort(by_count[:k]), [n_sym]))) - 1
        return k + int((-(-gaps // 256)).sum())

    lo, hi = 0, min(256, n_sym)  # first_bytes(k) never decreases with k: bisect the largest k that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if first_bytes(mid) <= 256 else (lo, mid - 1)
    single = np.zeros(n_sym, bool)
    single[by_count[:lo]] = True
    # a new first byte starts at every one-byte id, after it, and every 256 ids within a run
    run_start = single | np.concatenate(([True], single[:-1]))
    run_id = np.cumsum(run_start) - 1
    offset = np.arange(n_sym) - np.flatnonzero(run_start)[run_id]
    new_byte = run_start | (offset % 256 == 0)
    first_b = np.cumsum(new_byte) - 1
    second_b = np.where(single, -1, offset % 256)
    return first_b.astype(np.int64), second_b.astype(np.int64)


def suffix_array_bytes(tokens: np.ndarray, code: tuple[np.ndarray, np.ndarray] | None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Suffix array of the shard's text as bytes: ``(sa int32/int64[B], starts_W, rank_W, step)``.
    With an alphabetic ``code`` the text is coded by it (``starts_W`` / ``rank_W``: which bytes start
    a code, see ``encode_bytes``); without, ids are written big-endian in ``step`` bytes (one byte
    when every id is below 256; both arrays empty). Either way the token suffixes come out in
    token order.

    Calls libdivsufsort (the library pydivsufsort wraps) directly: ctypes releases the GIL for the
    call, and this skips the wrapper's shift, copies and filtering passes."""
    top = int(tokens.max()) if len(tokens) else 0
    starts_W, rank_W = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    if top < 1 << 8:
        step, text = 1, np.ascontiguousarray(tokens, dtype=np.uint8)
    elif code is not None:
        step = 0
        text, starts_W, rank_W = encode_bytes(tokens, *code)
    else:
        step = 2 if top < 1 << 16 else 4
        text = np.ascontiguousarray(tokens, dtype=f">u{step}").view(np.uint8)
    n = len(text)
    wide = n > np.iinfo(np.int32).max
    sa = np.empty(n, np.int64 if wide else np.int32)
    lib, fn, c_n = (libdivsufsort64, "divsufsort64", ctypes.c_int64) if wide else \
        (libdivsufsort, "divsufsort", ctypes.c_int32)
    if n and getattr(lib, fn)(text.ctypes.data_as(ctypes.c_void_p), sa.ctypes.data_as(ctypes.c_void_p), c_n(n)):
        raise RuntimeError(f"libdivsufsort failed on a shard of {len(tokens)} tokens")
    return sa, starts_W, rank_W, step


def _sort_shard(tokens: np.ndarray, counts_V1: np.ndarray, sa_out_u8: np.ndarray, s0: int, s1: int, bits: int
                ) -> tuple[int, np.ndarray, np.ndarray]:
    """Sorts shard [s0, s1) and packs its entries; returns (positions, edge indices, edge values):
    the entries sharing a byte with a neighbouring shard, written after all threads are done."""
    sa, starts_W, rank_W, step = suffix_array_bytes(tokens[s0:s1], alphabetic_code(counts_V1))  # nogil
    edge_g, edge_v = pack_suffix_array(sa, starts_W, rank_W, step, sa_out_u8, s0, bits, (s0 * bits + 7) >> 3,
                                       (s1 * bits) >> 3)
    return s1 - s0, edge_g, edge_v


def write_index(
    directory: Path,
    tokens_P: np.ndarray,
    doc_starts_D1: np.ndarray,
    *,
    vocab_size: int,
    metadata: Sequence[dict[str, Any]],
    tokenizer_name: str,
    tokenizer_hash: str,
    shard_tokens: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    extra_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes all index files into ``directory`` (already created, empty) and returns the manifest.

    ``tokens_P`` holds every document followed by the separator ``vocab_size``, in the on-disk
    dtype; ``doc_starts_D1`` int64[D+1] are document start positions (last = len(tokens_P))."""
    t0 = time.perf_counter()
    directory = Path(directory)
    dtype = fmt.token_dtype(vocab_size)
    tokens_P = np.ascontiguousarray(tokens_P, dtype=dtype)
    num_docs = len(doc_starts_D1) - 1
    if len(metadata) != num_docs:
        raise ValueError(f"metadata has {len(metadata)} rows for {num_docs} documents")
    threads = threads or os.cpu_count() or 1
    bounds_S1 = plan_shards(doc_starts_D1, shard_tokens, threads)
    bits = fmt.sa_bits(int(np.diff(bounds_S1).max()) if len(bounds_S1) > 1 else 1)
    n = len(tokens_P)
    shards = list(zip(bounds_S1[:-1].tolist(), bounds_S1[1:].tolist()))

    counts_SxV1 = shard_counts(tokens_P, bounds_S1, vocab_size + 1)
    t_sort = time.perf_counter()
    sa_u8 = np.memmap(directory / fmt.SA_FILE, dtype=np.uint8, mode="w+", shape=(fmt.sa_bytes(n, bits),))
    edges = []
    with tqdm(total=n, unit="tok", unit_scale=True, desc="sorting shards", disable=not progress) as bar, \
            ThreadPoolExecutor(max_workers=max(1, min(threads, len(shards)))) as pool:
        futures = [pool.submit(_sort_shard, tokens_P, counts_SxV1[s], sa_u8, a, b, bits)
                   for s, (a, b) in enumerate(shards)]
        # while the shards sort: the small files (the GIL is free while libdivsufsort runs)
        tokens_P.tofile(directory / fmt.TOKENS_FILE)
        np.asarray(doc_starts_D1, "<i8").tofile(directory / fmt.DOC_STARTS_FILE)
        counts_SxV1.astype("<i4", copy=False).tofile(directory / fmt.SHARD_COUNTS_FILE)
        _write_metadata(directory / fmt.METADATA_FILE, metadata)
        for fut in as_completed(futures):
            positions, edge_g, edge_v = fut.result()
            edges.append((edge_g, edge_v))
            bar.update(positions)
    for edge_g, edge_v in edges:
        write_entries(sa_u8, bits, edge_g, edge_v)
    # unmapped without msync: like the files written above, the pages reach the disk by the
    # kernel's writeback (a synchronous flush of the suffix array would dominate the build)
    del sa_u8
    sort_s = time.perf_counter() - t_sort

    meta = {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "tokenizer_name": tokenizer_name,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": int(vocab_size),
        "token_dtype": dtype.str,
        "separator": int(vocab_size),
        "num_tokens": int(n - num_docs),
        "num_docs": int(num_docs),
        "num_positions": int(n),
        "shard_starts": [int(x) for x in bounds_S1],
        "sa_bits": int(bits),
        "build": {
            "sort_seconds": round(sort_s, 4),
            "write_seconds": round(time.perf_counter() - t0, 4),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
    }
    meta.update(extra_manifest or {})
    manifest = write_manifest(directory, meta)
    remember_verified(directory, manifest)  # just hashed: the first open need not hash it again
    return manifest


def _write_metadata(path: Path, metadata: Sequence[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # one encoder for every row: json.dumps with options builds a new one per call
    encode = json.JSONEncoder(sort_keys=True, default=str).encode
    risk, category, meta_json = [], [], []
    for d, meta in enumerate(metadata):
        try:
            risk.append(policy_risk(meta))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"metadata[{d}]: {err}") from None
        category.append(str(meta.get("category", "") or ""))
        meta_json.append(encode(meta))
    table = pa.table({
        "risk": pa.array(risk, pa.float64()),
        "category": pa.array(category, pa.string()),
        "meta_json": pa.array(meta_json, pa.string()),
    })
    pq.write_table(table, path)


def concat_documents(docs: Sequence[np.ndarray], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates documents with a separator after each; returns (tokens_P, doc_starts_D1).

    Raises ValueError naming the document if a token is outside ``[0, vocab_size)``."""
    dtype = fmt.token_dtype(vocab_size)
    docs = [np.asarray(d).reshape(-1) for d in docs]
    lengths = np.fromiter(map(len, docs), np.int64, count=len(docs))
    doc_starts_D1 = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(lengths + 1, out=doc_starts_D1[1:])
    flat = np.concatenate(docs) if docs else np.zeros(0, dtype)
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        bad = int(np.flatnonzero((flat < 0) | (flat >= vocab_size))[0])
        d = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise ValueError(f"document {d}: token ids must lie in [0, {vocab_size}), got "
                         f"[{docs[d].min()}, {docs[d].max()}]")
    tokens_P = np.empty(int(doc_starts_D1[-1]), dtype)
    sep_P = doc_starts_D1[1:] - 1
    tokens_P[sep_P] = vocab_size
    keep = np.ones(len(tokens_P), bool)
    keep[sep_P] = False
    tokens_P[keep] = flat
    return tokens_P, doc_starts_D1


def build_index_from_tokens(
    docs: Sequence[np.ndarray],
    out_dir: str | Path,
    *,
    vocab_size: int,
    metadata: Sequence[dict[str, Any]],
    tokenizer_name: str = "none",
    tokenizer_hash: str = "none",
    shard_tokens: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Builds an index over already-tokenized documents (tests, synthetic corpora).

    Args:
      docs: one int array of token ids per document (ids in ``[0, vocab_size)``).
      metadata: one dict per document with a policy label (``unsafe: bool`` or ``risk`` in [0, 1]),
        optionally ``category`` and any other JSON-able fields.
      shard_tokens: target positions per shard (shards end at document boundaries); None = automatic.
    Returns the index directory.
    """
    out_dir = Path(out_dir)
    tokens_P, doc_starts_D1 = concat_documents(docs, vocab_size)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        write_index(tmp, tokens_P, doc_starts_D1, vocab_size=vocab_size, metadata=metadata,
                    tokenizer_name=tokenizer_name, tokenizer_hash=tokenizer_hash, shard_tokens=shard_tokens,
                    threads=threads, progress=progress)
    return out_dir
