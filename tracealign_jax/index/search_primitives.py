"""What every suffix-array search kernel shares: SA entries, the comparison, the fence, prefetch.

Kernels (numba, ``nogil``, all shards in one call): ``single_search``, ``interleaved_search``,
``match_spans``, ``next_tokens``; build-side packing is in ``sa_packing``.

Layout (``format.py``): ``tokens`` is the whole token array, each document followed by the separator
``sep`` = vocab size (it sorts last; no match crosses a document); ``sa_u8`` the bit-packed
shard-local suffix arrays back to back; ``shard_starts_S1`` int64[S+1] token offsets of the shards;
``bucket_SxV2`` int64[S, V+2] where each first token's block starts in a shard's suffix array, so a
search starts inside one block and a one-token count needs no search. ``fence_F`` (uint64, built at
open by ``build_fence``) holds tokens 2-3 of every FENCE_RATE-th suffix, so a search narrows the
block by bisecting a small cached array before it touches the suffix array.

Queries are int64 with tokens in ``[0, sep)`` (callers cut or reject others), so a query never
matches a separator. Batched kernels take absolute offsets into the flat query array, so callers
split a batch into chunks and run them in threads (``nogil``; blocking threads share a busy machine
better than a spinning OpenMP team).

Binary searches keep the LCP with both bracket ends (Manber-Myers ``min(llcp, hlcp)``), so each
comparison starts where the known common prefix ends; inside a first-token block both start at 1,
and at the end of a lower-bound search the larger of the two is the longest match in the shard.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic



def _ensure_cache_dir() -> None:
    """Compiled kernels are cached on disk (``cache=True``: a query command loads them in ~1 s instead of
    compiling for seconds). Numba writes next to the sources, else to a per-user dir; where neither is
    writable (a read-only install and home) it would refuse to decorate at all, so point it at a temp dir."""
    import os
    import tempfile

    from numba.core import config

    if config.CACHE_DIR:
        return
    for d in (os.path.join(os.path.dirname(__file__), "__pycache__"),
              os.path.join(os.path.expanduser("~"), ".cache", "numba")):  # fmt: skip
        try:
            os.makedirs(d, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=d):
                return
        except OSError:
            continue
    config.CACHE_DIR = tempfile.mkdtemp(prefix="tracealign-numba-")


_ensure_cache_dir()
_JIT = dict(nogil=True, cache=True)


@intrinsic
def _prefetch(typingctx, arr, index):
    """Hints the CPU to load ``arr[index]`` into cache (``llvm.prefetch``: read, keep, data)."""
    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(arr, index), codegen


@njit(inline="always", **_JIT)
def _sa_at(sa_u8, bits, index):
    """Shard-local position stored at global SA index ``index`` (``bits``-bit little-endian field).
    The file's padding makes the 4- or 5-byte load safe at the last entry."""
    bit = index * bits
    off = bit >> 3
    v = (np.int64(sa_u8[off]) | (np.int64(sa_u8[off + 1]) << 8) | (np.int64(sa_u8[off + 2]) << 16)
         | (np.int64(sa_u8[off + 3]) << 24))
    if bits > 25:  # the field may reach into a fifth byte
        v |= np.int64(sa_u8[off + 4]) << 32
    return (v >> (bit & 7)) & ((np.int64(1) << bits) - 1)


@njit(inline="always", **_JIT)
def _compare(tokens, pos, end, q, qs, qe, k0):
    """Compares suffix ``tokens[pos:end]`` with ``q[qs:qe]``, both known equal on the first ``k0``.

    Returns ``(sign, lcp)``: sign 0 when the query is a prefix of the suffix, -1 when the suffix sorts
    before the query (including a suffix that is a proper prefix of it), +1 when after."""
    k = k0
    n = end - pos
    m = qe - qs
    lim = n if n < m else m
    while k < lim:
        a = np.int64(tokens[pos + k])
        b = q[qs + k]
        if a != b:
            return (1 if a > b else -1), k
        k += 1
    if k == m:
        return 0, k
    return -1, k


FENCE_SHIFT = 5
FENCE_RATE = 1 << FENCE_SHIFT


@njit(**_JIT)
def build_fence(tokens, sa_u8, bits, shard_starts_S1):
    """uint64[ceil(P / FENCE_RATE)]: for every FENCE_RATE-th global SA index, the suffix's second
    and third token as ``t1 << 32 | t2`` (0 past the shard's end, which only a separator's suffix
    reaches). Within a first-token block these keys ascend with the rank."""
    n = shard_starts_S1[len(shard_starts_S1) - 1]
    fence_F = np.zeros((n + FENCE_RATE - 1) >> FENCE_SHIFT, np.uint64)
    s = 0
    for k in range(len(fence_F)):
        g = np.int64(k) << FENCE_SHIFT
        while g >= shard_starts_S1[s + 1]:
            s += 1
        s0 = shard_starts_S1[s]
        s1 = shard_starts_S1[s + 1]
        pos = s0 + _sa_at(sa_u8, bits, g)
        t1 = np.uint64(tokens[pos + 1]) if pos + 1 < s1 else np.uint64(0)
        t2 = np.uint64(tokens[pos + 2]) if pos + 2 < s1 else np.uint64(0)
        fence_F[k] = (t1 << np.uint64(32)) | t2
    return fence_F


@njit(inline="always", **_JIT)
def _narrow(fence_F, s0, lo, hi, q, qs, qe):
    """Narrows q's first-token block [lo, hi) (shard-local ranks, shard at global s0) to the ranks
    between the fence samples around q's second and third token. Returns (lo, hi, llcp, hlcp, mlo,
    mhi): exact LCPs of q with the suffixes at lo - 1 and hi where those are fence samples inside
    the block (a sample's key differs from q's there, at the second or third token), else 1; and
    when q has at most 3 tokens and some samples start with q, the first and last such rank (the
    lower bound is then in [lo, mlo], the upper in [mhi + 1, hi]), else -1, -1."""
    m = qe - qs
    if m < 2 or hi - lo <= 2 * FENCE_RATE:
        return lo, hi, np.int64(1), np.int64(1), np.int64(-1), np.int64(-1)
    t1 = np.uint64(q[qs + 1])
    key_lo = t1 << np.uint64(32)
    key_hi = key_lo | np.uint64(0xFFFFFFFF)
    if m >= 3:
        key_lo |= np.uint64(q[qs + 2])
        key_hi = key_lo
    k0 = (s0 + lo + FENCE_RATE - 1) >> FENCE_SHIFT
    k1 = (s0 + hi + FENCE_RATE - 1) >> FENCE_SHIFT
    a = k0
    b = k1
    while a < b:  # first sample with key >= key_lo
        mid = (a + b) >> 1
        if fence_F[mid] < key_lo:
            a = mid + 1
        else:
            b = mid
    jl = a
    b = k1
    while a < b:  # first sample with key > key_hi
        mid = (a + b) >> 1
        if fence_F[mid] <= key_hi:
            a = mid + 1
        else:
            b = mid
    jh = a
    llcp = np.int64(1)
    hlcp = np.int64(1)
    if jl > k0:
        lo = ((jl - 1) << FENCE_SHIFT) - s0 + 1
        llcp = 2 if (fence_F[jl - 1] >> np.uint64(32)) == t1 else 1
    if jh < k1:
        hi = (jh << FENCE_SHIFT) - s0
        hlcp = 2 if (fence_F[jh] >> np.uint64(32)) == t1 else 1
    mlo = np.int64(-1)
    mhi = np.int64(-1)
    if m <= 3 and jh > jl:
        mlo = (jl << FENCE_SHIFT) - s0
        mhi = ((jh - 1) << FENCE_SHIFT) - s0
    return lo, hi, llcp, hlcp, mlo, mhi


@njit(inline="always", **_JIT)
def _in_vocab(q, qs, qe, sep):
    for k in range(qs, qe):
        if q[k] < 0 or q[k] >= sep:
            return False
    return True
