"""Builds a TraceIndex from token ids: separators, shards sorted in parallel threads, packed SA, manifest.

``build_index_from_tokens`` is the core (tests and synthetic corpora call it directly);
``build_index`` in ``corpus.py`` tokenizes JSONL/Parquet records first and then calls ``write_index``.
Everything is written inside ``atomic_directory``: a crashed build leaves no half index that loads.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydivsufsort import divsufsort
from tqdm.auto import tqdm

from tracealign_jax.atomic_io import atomic_directory, write_manifest
from tracealign_jax.index import format as fmt
from tracealign_jax.index.kernels import pack_suffix_array

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


def _sort_shard(tokens: np.ndarray, sa_out_u8: np.ndarray, s0: int, s1: int, width: int) -> int:
    sa = divsufsort(tokens[s0:s1])  # releases the GIL
    pack_suffix_array(sa, sa_out_u8[s0 * width:s1 * width], width)  # nogil
    return s1 - s0


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
    width = fmt.sa_width(int(np.diff(bounds_S1).max()) if len(bounds_S1) > 1 else 1)
    n = len(tokens_P)

    tokens_P.tofile(directory / fmt.TOKENS_FILE)
    np.asarray(doc_starts_D1, "<i8").tofile(directory / fmt.DOC_STARTS_FILE)
    counts_V = np.bincount(tokens_P, minlength=vocab_size + 1)[:vocab_size].astype("<i8")
    counts_V.tofile(directory / fmt.UNIGRAM_FILE)
    _write_metadata(directory / fmt.METADATA_FILE, metadata)

    t_sort = time.perf_counter()
    sa_path = directory / fmt.SA_FILE
    if n:
        sa_u8 = np.memmap(sa_path, dtype=np.uint8, mode="w+", shape=(n * width,))
        shards = list(zip(bounds_S1[:-1].tolist(), bounds_S1[1:].tolist()))
        with tqdm(total=n, unit="tok", unit_scale=True, desc="sorting shards", disable=not progress) as bar:
            if len(shards) == 1 or threads == 1:
                for a, b in shards:
                    bar.update(_sort_shard(tokens_P, sa_u8, a, b, width))
            else:
                with ThreadPoolExecutor(max_workers=min(threads, len(shards))) as pool:
                    futures = [pool.submit(_sort_shard, tokens_P, sa_u8, a, b, width) for a, b in shards]
                    for fut in as_completed(futures):
                        bar.update(fut.result())
        sa_u8.flush()
        del sa_u8
    else:
        sa_path.write_bytes(b"")
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
        "sa_width": int(width),
        "build": {
            "sort_seconds": round(sort_s, 4),
            "write_seconds": round(time.perf_counter() - t0, 4),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
    }
    meta.update(extra_manifest or {})
    return write_manifest(directory, meta)


def _write_metadata(path: Path, metadata: Sequence[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    risk, category, meta_json = [], [], []
    for d, meta in enumerate(metadata):
        try:
            risk.append(policy_risk(meta))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"metadata[{d}]: {err}") from None
        category.append(str(meta.get("category", "") or ""))
        meta_json.append(json.dumps(meta, sort_keys=True, default=str))
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
    lengths = np.fromiter((len(d) + 1 for d in docs), np.int64, count=len(docs))
    doc_starts_D1 = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(lengths, out=doc_starts_D1[1:])
    tokens_P = np.full(int(doc_starts_D1[-1]), vocab_size, dtype)
    for d, doc in enumerate(docs):
        doc = np.asarray(doc)
        if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
            raise ValueError(f"document {d}: token ids must lie in [0, {vocab_size}), got "
                             f"[{doc.min()}, {doc.max()}]")
        tokens_P[doc_starts_D1[d]:doc_starts_D1[d + 1] - 1] = doc
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
