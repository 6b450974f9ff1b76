"""The host side of the veto table: compile (span tokens, BCI) pairs into a ``VetoTable``, save, load.

NumPy only, run once ahead of time; the layout and the jittable lookup live in ``veto.table``.
Files: raw little-endian arrays + ``table.json`` + a checksummed manifest (no pickle, no npz).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from tracealign_jax.atomic_io import IntegrityError, atomic_directory, verify_manifest, write_manifest
from tracealign_jax.veto import context_hash
from tracealign_jax.veto.table import ARRAYS, VetoTable

FORMAT = "tracealign-veto-table-v1"


def compile_veto_table(spans: Sequence[tuple[Sequence[int], float]] | tuple[np.ndarray, np.ndarray, np.ndarray],
                       *, max_span: int, max_entries: int, entry_weights_NxL: np.ndarray | None = None,
                       min_penalty: float = 0.0) -> VetoTable:
    """Compiles (span tokens, BCI) pairs into a ``VetoTable`` of NumPy arrays (host, vectorized).

    spans: a list of ``(tokens, bci)`` pairs, or the packed form ``(tokens_NxL int, lengths_N int,
      bci_N float)`` (faster for millions of spans). Spans longer than ``max_span`` are cut to it.
    entry_weights_NxL: optional float[N, >= max_span]; column k weights the entry that predicts token k
      of span i from its first k tokens (penalty = bci_N[i] x w[i, k]). Entries whose penalty is
      <= ``min_penalty`` (nats) are left out.
    Raises IntegrityError if two different contexts share all 96 hash bits (never observed; checked
    so it can never be silent).
    """
    if isinstance(spans, tuple) and len(spans) == 3 and isinstance(spans[0], np.ndarray):
        tokens_NxL, lengths_N, bci_N = spans
        tokens_NxL = np.asarray(tokens_NxL, dtype=np.int64)[:, :max_span]
        lengths_N = np.minimum(np.asarray(lengths_N, dtype=np.int64), max_span)
        bci_N = np.asarray(bci_N, dtype=np.float32)
    else:
        n = len(spans)
        tokens_NxL = np.zeros((n, max_span), dtype=np.int64)
        lengths_N = np.zeros((n,), dtype=np.int64)
        bci_N = np.zeros((n,), dtype=np.float32)
        for i, (toks, bci) in enumerate(spans):
            toks = np.asarray(toks, dtype=np.int64)[:max_span]
            tokens_NxL[i, : len(toks)] = toks
            lengths_N[i] = len(toks)
            bci_N[i] = bci
    context_len = max(max_span - 1, 1)
    parts = {"hi": [], "lo": [], "chk": [], "ident": [], "next": [], "pen": []}
    for k in range(1, max_span):
        rows = np.nonzero(lengths_N > k)[0]
        if rows.size == 0:
            continue
        pen = bci_N[rows] if entry_weights_NxL is None else bci_N[rows] * entry_weights_NxL[rows, k]
        rows, pen = rows[pen > min_penalty], pen[pen > min_penalty].astype(np.float32)
        if rows.size == 0:
            continue
        ctx = tokens_NxL[rows, :k]
        hi, lo, chk = context_hash.hash_contexts_np(ctx)
        for key, val in (("hi", hi), ("lo", lo), ("chk", chk), ("ident", _identity_u64(ctx)),
                         ("next", tokens_NxL[rows, k]), ("pen", pen)):
            parts[key].append(val)
    if not parts["hi"]:
        return _from_sorted_entries(*(np.zeros(0, t) for t in (np.uint32,) * 3), np.zeros(0, np.int32),
                                    np.zeros(0, np.float32), context_len, max_entries)
    hi, lo, chk, ident, nxt, pen = (np.concatenate(parts[n]) for n in ("hi", "lo", "chk", "ident", "next", "pen"))
    # Sort by context key, then next token, then penalty descending: first of each (ctx, next) is the max.
    # Packing (hi, lo) and (chk, next) into two uint64 keys makes this a 3-key sort instead of 5.
    k1 = (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)
    k2 = (chk.astype(np.uint64) << np.uint64(32)) | nxt.astype(np.uint64)
    order = _sort_entries(k1, k2, pen)
    hi, lo, chk, ident, nxt, pen = (a[order] for a in (hi, lo, chk, ident, nxt, pen))
    new_ctx = np.ones(hi.size, dtype=bool)
    new_ctx[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1]) | (chk[1:] != chk[:-1])
    if np.any(~new_ctx[1:] & (ident[1:] != ident[:-1])):
        raise IntegrityError("veto table: two different contexts share all 96 hash bits; cannot build safely")
    keep = new_ctx.copy()
    keep[1:] |= nxt[1:] != nxt[:-1]
    hi, lo, chk, nxt, pen, new_ctx = (a[keep] for a in (hi, lo, chk, nxt, pen, new_ctx))
    keep = _cap_per_context(new_ctx, pen, max_entries)
    return _from_sorted_entries(hi[keep], lo[keep], chk[keep], nxt[keep].astype(np.int32), pen[keep],
                                context_len, max_entries)


def _sort_entries(k1: np.ndarray, k2: np.ndarray, pen: np.ndarray) -> np.ndarray:
    """The order sorting by (k1, k2, -pen). np.lexsort is much slower than one argsort and most contexts
    have a single entry: argsort k1 once, then lexsort only the runs of equal k1."""
    order = np.argsort(k1)
    k1s = k1[order]
    tie = np.zeros(k1s.size, bool)
    tie[1:] = k1s[1:] == k1s[:-1]
    tie[:-1] |= tie[1:]
    sub = np.flatnonzero(tie)  # whole runs of equal k1, in k1 order
    if sub.size:
        o = order[sub]
        order[sub] = o[np.lexsort((-pen[o], k2[o], k1s[sub]))]
    return order


def _cap_per_context(new_ctx: np.ndarray, pen: np.ndarray, max_entries: int) -> np.ndarray:
    """Sorted indices of the entries to keep: all of small contexts, the top ``max_entries`` penalties
    of larger ones (only those few contexts are re-sorted)."""
    starts = np.flatnonzero(new_ctx)
    sizes = np.diff(np.append(starts, new_ctx.size))
    big = np.repeat(sizes > max_entries, sizes)
    if not big.any():
        return np.arange(new_ctx.size)
    idx = np.flatnonzero(big)
    group = np.repeat(np.arange(sizes.size), sizes)[idx]
    order = np.lexsort((-pen[idx], group))
    idx, group = idx[order], group[order]
    pos = np.arange(idx.size)
    first = np.ones(idx.size, bool)
    first[1:] = group[1:] != group[:-1]
    rank = pos - np.maximum.accumulate(np.where(first, pos, 0))
    return np.sort(np.concatenate([np.flatnonzero(~big), idx[rank < max_entries]]))


def _from_sorted_entries(hi: np.ndarray, lo: np.ndarray, chk: np.ndarray, nxt: np.ndarray, pen: np.ndarray,
                         context_len: int, max_entries: int) -> VetoTable:
    """Entries sorted by (hi, lo, chk) -> CSR table; pads so every array is non-empty for gathers."""
    new_ctx = np.ones(hi.size, dtype=bool)
    if hi.size:
        new_ctx[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1]) | (chk[1:] != chk[:-1])
    first = np.nonzero(new_ctx)[0]
    offsets = np.concatenate([first, [hi.size]]).astype(np.int32)
    ctx_hi, ctx_lo, ctx_chk = hi[first], lo[first], chk[first]
    if ctx_hi.size == 0:  # a sentinel context with no entries keeps searchsorted/gather shapes valid
        ctx_hi = ctx_lo = ctx_chk = np.full(1, 0xFFFFFFFF, np.uint32)
        offsets = np.zeros(2, np.int32)
    # One trailing dummy entry (outside every CSR range) so gathers never index an empty array.
    nxt = np.concatenate([nxt, np.zeros(1, np.int32)]).astype(np.int32)
    pen = np.concatenate([pen, np.zeros(1, np.float32)]).astype(np.float32)
    run = _longest_run(ctx_hi)
    return VetoTable(ctx_hi=ctx_hi.astype(np.uint32), ctx_lo=ctx_lo.astype(np.uint32),
                     ctx_chk=ctx_chk.astype(np.uint32), offsets=offsets, next_tokens=nxt, penalties=pen,
                     context_len=int(context_len), max_entries=int(max_entries), hi_run=run)


def _identity_u64(ctx_NxK: np.ndarray) -> np.ndarray:
    """A host-only 64-bit polynomial identity of each context (with its length), to prove keys unique."""
    n, k = ctx_NxK.shape
    h = np.full(n, k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * np.uint64(0x100000001B3) + ctx_NxK[:, j].astype(np.uint64) + np.uint64(1)
    return h


def _longest_run(sorted_u32: np.ndarray) -> int:
    if sorted_u32.size == 0:
        return 1
    change = np.nonzero(np.diff(sorted_u32.astype(np.int64)) != 0)[0]
    bounds = np.concatenate([[-1], change, [sorted_u32.size - 1]])
    return int(np.max(np.diff(bounds)))


def save_veto_table(table: VetoTable, out_dir: str | Path, *, meta: dict | None = None,
                    overwrite: bool = False) -> Path:
    """Writes raw little-endian arrays + ``table.json`` + checksummed manifest (no pickle, no npz)."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        shapes = {}
        for name, dtype in ARRAYS.items():
            arr = np.ascontiguousarray(np.asarray(getattr(table, name)).astype(np.dtype(dtype).newbyteorder("<")))
            (tmp / f"{name}.bin").write_bytes(arr.tobytes())
            shapes[name] = list(arr.shape)
        info = {"format": FORMAT, "context_len": table.context_len, "max_entries": table.max_entries,
                "hi_run": table.hi_run, "shapes": shapes, "meta": meta or {}}
        (tmp / "table.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        write_manifest(tmp, {"format": FORMAT})
    return out_dir


def load_veto_table(path: str | Path, *, checksums: bool = True, device: bool = True) -> tuple[VetoTable, dict]:
    """Reads a saved table (verifying the manifest); returns (table on device or as NumPy, meta dict)."""
    path = Path(path)
    verify_manifest(path, checksums=checksums)
    info = json.loads((path / "table.json").read_text())
    if info.get("format") != FORMAT:
        raise IntegrityError(f"{path / 'table.json'}: format {info.get('format')!r}, expected {FORMAT!r}")
    arrays = {}
    for name, dtype in ARRAYS.items():
        raw = np.frombuffer((path / f"{name}.bin").read_bytes(), dtype=np.dtype(dtype).newbyteorder("<"))
        shape = tuple(info["shapes"][name])
        if raw.size != int(np.prod(shape)):
            raise IntegrityError(f"{path / (name + '.bin')}: {raw.size} values, table.json says shape {shape}")
        arr = raw.reshape(shape).astype(dtype)
        arrays[name] = jnp.asarray(arr) if device else arr
    table = VetoTable(**arrays, context_len=int(info["context_len"]), max_entries=int(info["max_entries"]),
                      hi_run=int(info["hi_run"]))
    return table, info.get("meta", {})
