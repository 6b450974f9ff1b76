"""Compiled suffix-array search kernels (numba, ``nogil``): every shard is searched inside one call.

Layout the kernels see (see ``format.py``): ``tokens`` is the whole token array (uint16/uint32,
every document followed by the separator ``sep`` = vocab size, the largest value, so suffixes sort in
numeric token order and no match can cross a document); ``sa_u8`` holds the suffix arrays of all
shards back to back, each entry a shard-local position bit-packed into ``bits`` bits;
``shard_starts_S1`` (int64[S+1]) are the token offsets where shards begin (shard s covers tokens
``[shard_starts[s], shard_starts[s+1])`` and SA entries with the same indices); ``bucket_SxV2``
(int64[S, V+2]) is where each first token's block starts in a shard's suffix array
(``bucket[s, t]`` .. ``bucket[s, t + 1]``; ``bucket[s, sep]`` = the shard's non-separator suffixes,
``bucket[s, sep + 1]`` = the shard's length), so every search starts inside one block, already
knowing one matching token, and a one-token count needs no search at all. ``fence_F`` (uint64,
built at open by ``build_fence``) holds the second and third token of every FENCE_RATE-th suffix
of the suffix array, so the search narrows the block to the suffixes sharing q's first three
tokens by bisecting a small cached array, before it touches the suffix array and the tokens.

Queries arrive as int64 arrays. Callers guarantee query tokens lie in ``[0, sep)``: a token outside
the vocabulary can never match and is handled before the kernels (or, in ``longest_matches``, by
cutting the query there), so a query can never match a separator.

Batched kernels take absolute offsets into the flat query array and return results for just that
slice, so the caller splits a big batch into chunks and runs them in threads: every kernel is
``nogil``, and Python threads that block are kinder to a busy machine than an OpenMP team that spins.

Binary searches keep the LCP with both bracket ends (Manber-Myers ``min(llcp, hlcp)`` skip), so a
comparison starts where the known common prefix ends. Inside a first-token block both brackets
start at 1. At the end of a lower-bound search the larger of the two LCPs is the longest match in
the shard: a bracket still at the block's edge reads 1 where the true LCP with the rank outside the
block is 0, but then the other bracket was compared and is >= 1, so the maximum is exact.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_JIT = dict(nogil=True, cache=True)
# Searches interleaved by the batched kernels: enough that the prefetch issued for one lane has
# landed by the time the round comes back to it (a cache miss is ~100 ns, a lane step ~10 ns).
LANES = 16


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


@njit(**_JIT)
def _lower_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, lo, hi, llcp, hlcp):
    """First shard rank in [lo, hi] whose suffix is >= q (as a prefix), given that rank lo - 1 is
    before q and rank hi starts with q (or is hi = n), with those LCP brackets."""
    while lo < hi:
        mid = (lo + hi) >> 1
        k0 = llcp if llcp < hlcp else hlcp
        c, lcp = _compare(tokens, s0 + _sa_at(sa_u8, bits, s0 + mid), s1, q, qs, qe, k0)
        if c < 0:
            lo = mid + 1
            llcp = lcp
        else:
            hi = mid
            hlcp = lcp
    return lo


@njit(**_JIT)
def _upper_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, lo, hi, hlcp):
    """First shard rank in [lo, hi] whose suffix sorts after every suffix starting with q, given
    that rank lo - 1 starts with q and rank hi (if < n) does not, sharing ``hlcp`` tokens with q."""
    llcp = qe - qs
    while lo < hi:
        mid = (lo + hi) >> 1
        k0 = llcp if llcp < hlcp else hlcp
        c, lcp = _compare(tokens, s0 + _sa_at(sa_u8, bits, s0 + mid), s1, q, qs, qe, k0)
        if c <= 0:
            lo = mid + 1
            llcp = lcp
        else:
            hi = mid
            hlcp = lcp
    return lo


@njit(**_JIT)
def _shard_range(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, s, q, qs, qe):
    """[lo, hi) shard ranks whose suffixes start with q[qs:qe] (tokens in [0, sep)); the empty query
    spans every non-separator suffix (separators sort last).

    The search starts in q's first-token block. One shared bisection runs until it hits a suffix
    starting with q; from there the lower and the upper bound are two independent bisections of the
    two halves, each keeping its LCP brackets."""
    m = qe - qs
    if m == 0:
        return np.int64(0), bucket_SxV2[s, bucket_SxV2.shape[1] - 2]
    t = q[qs]
    lo = bucket_SxV2[s, t]
    hi = bucket_SxV2[s, t + 1]
    if m == 1 or lo == hi:
        return lo, hi
    s0 = shard_starts_S1[s]
    s1 = shard_starts_S1[s + 1]
    lo, hi, llcp, hlcp, mlo, mhi = _narrow(fence_F, s0, lo, hi, q, qs, qe)
    if mlo >= 0:  # fence samples start with q: the two bounds lie within a sample gap each
        return (_lower_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, lo, mlo, llcp, m),
                _upper_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, mhi + 1, hi, hlcp))
    while lo < hi:
        mid = (lo + hi) >> 1
        k0 = llcp if llcp < hlcp else hlcp
        c, lcp = _compare(tokens, s0 + _sa_at(sa_u8, bits, s0 + mid), s1, q, qs, qe, k0)
        if c < 0:
            lo = mid + 1
            llcp = lcp
        elif c > 0:
            hi = mid
            hlcp = lcp
        else:
            # lower bound in [lo, mid]: brackets (llcp, m); upper bound in [mid + 1, hi]: brackets (m, hlcp)
            return (_lower_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, lo, mid, llcp, m),
                    _upper_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, mid + 1, hi, hlcp))
    return lo, lo


@njit(inline="always", **_JIT)
def _in_vocab(q, qs, qe, sep):
    for k in range(qs, qe):
        if q[k] < 0 or q[k] >= sep:
            return False
    return True


@njit(inline="always", **_JIT)
def _count(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, qs, qe):
    total = np.int64(0)
    for s in range(len(shard_starts_S1) - 1):
        lo, hi = _shard_range(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, s, q, qs, qe)
        total += hi - lo
    return total


@njit(**_JIT)
def count_one(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q):
    """Occurrences of q (int64[L]); 0 when a token is outside the vocabulary [0, sep). The shards'
    searches run interleaved (``_ranges_lanes``), so their cache misses overlap."""
    if not _in_vocab(q, 0, len(q), bucket_SxV2.shape[1] - 2):
        return np.int64(0)
    n_shards = len(shard_starts_S1) - 1
    if len(q) <= 1 or n_shards == 1:
        return _count(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, 0, len(q))
    lo_1xS = np.zeros((1, n_shards), np.int64)
    hi_1xS = np.zeros((1, n_shards), np.int64)
    zero = np.zeros(1, np.int64)
    _ranges_lanes(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, zero, np.full(1, len(q), np.int64),
                  zero, lo_1xS, hi_1xS)
    return (hi_1xS - lo_1xS).sum()


@njit(**_JIT)
def search_keys(q_flat, q_offsets_N1, sep):
    """uint64[N] sort keys: the first tokens of each query, ``tok + 1`` in fixed-width fields (0 past
    the end), so sorting the keys orders queries lexicographically on those tokens and queries that
    walk the same suffix-array path run back to back (their search paths stay in cache)."""
    n = len(q_offsets_N1) - 1
    field = np.int64(1)
    while (np.int64(1) << field) <= sep + 1:
        field += 1
    per_key = 64 // field
    keys = np.zeros(n, np.uint64)
    for i in range(n):
        qs = q_offsets_N1[i]
        qe = q_offsets_N1[i + 1]
        k = np.uint64(0)
        for j in range(per_key):
            v = np.int64(0)
            if qs + j < qe:
                v = q_flat[qs + j] + 1
                if v < 0 or v > sep:
                    v = sep + 1  # out of vocabulary: never matches, any place in the order will do
            k = (k << np.uint64(field)) | np.uint64(v)
        keys[i] = k
    return keys


@njit(inline="always", **_JIT)
def _same_query(q, a0, a1, b0, b1):
    if a1 - a0 != b1 - b0:
        return False
    for k in range(a1 - a0):
        if q[a0 + k] != q[b0 + k]:
            return False
    return True


# ---- interleaved searches ---------------------------------------------------------------------
# A binary search waits on two dependent cache misses per step (the SA entry, then the suffix's
# tokens). The batched kernels keep LANES searches in flight and advance them round-robin, one
# half-step at a time: a lane prefetches what its next half-step reads and yields to the others,
# so the misses of different searches overlap instead of queueing. A lane finds the SA range of one
# query in one shard exactly as ``_shard_range`` does (shared bisection, then the lower and the
# upper bound), as a state machine: phase 0 shared, 1 lower bound, 2 upper bound.

@njit(inline="always", **_JIT)
def _lane_start(sa_u8, bits, lane, i, s, lo, hi, llcp, hlcp, s0, st_lo, st_hi, st_llcp, st_hlcp, st_phase, st_pos,
                st_query, st_shard):
    st_lo[lane] = lo
    st_hi[lane] = hi
    st_llcp[lane] = llcp
    st_hlcp[lane] = hlcp
    st_phase[lane] = 0
    st_pos[lane] = -1  # the midpoint's SA entry is not read yet
    st_query[lane] = i
    st_shard[lane] = s
    _prefetch(sa_u8, ((s0 + ((lo + hi) >> 1)) * bits) >> 3)


@njit(**_JIT)
def _ranges_lanes(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, qs_N, qe_N, todo_T, lo_NxS,
                  hi_NxS):
    """SA ranges of queries ``todo_T`` (query i is ``q_flat[qs_N[i]:qe_N[i]]``, >= 2 tokens, all in
    the vocabulary) in every shard, written to lo_NxS / hi_NxS; LANES (query, shard) searches
    interleaved."""
    n_shards = len(shard_starts_S1) - 1
    st_lo = np.zeros(LANES, np.int64)
    st_hi = np.zeros(LANES, np.int64)
    st_llcp = np.zeros(LANES, np.int64)
    st_hlcp = np.zeros(LANES, np.int64)
    st_phase = np.zeros(LANES, np.int64)
    st_pos = np.zeros(LANES, np.int64)
    st_query = np.zeros(LANES, np.int64)
    st_shard = np.zeros(LANES, np.int64)
    st_up_lo = np.zeros(LANES, np.int64)  # the upper bound's range and bracket, saved at the split
    st_up_hi = np.zeros(LANES, np.int64)
    st_up_hlcp = np.zeros(LANES, np.int64)
    live = np.zeros(LANES, np.bool_)
    n_tasks = len(todo_T) * n_shards
    task = 0
    n_live = 0
    first_round = True
    while first_round or n_live > 0:
        first_round = False
        for g in range(LANES):
            if live[g]:
                i = st_query[g]
                s = st_shard[g]
                s0 = shard_starts_S1[s]
                lo = st_lo[g]
                hi = st_hi[g]
                mid = (lo + hi) >> 1
                k0 = st_llcp[g] if st_llcp[g] < st_hlcp[g] else st_hlcp[g]
                if st_pos[g] < 0:  # read the midpoint's SA entry, prefetch the tokens the comparison reads
                    pos = s0 + _sa_at(sa_u8, bits, s0 + mid)
                    st_pos[g] = pos
                    _prefetch(tokens, pos + k0)
                    continue
                qs = qs_N[i]
                qe = qe_N[i]
                c, lcp = _compare(tokens, st_pos[g], shard_starts_S1[s + 1], q_flat, qs, qe, k0)
                st_pos[g] = -1
                phase = st_phase[g]
                if phase == 0 and c == 0:  # hit: lower bound in [lo, mid], upper bound in [mid + 1, hi]
                    st_up_lo[g] = mid + 1
                    st_up_hi[g] = hi
                    st_up_hlcp[g] = st_hlcp[g]
                    hi = mid
                    st_hlcp[g] = lcp
                    phase = 1
                    st_phase[g] = 1
                elif c < 0 or (c == 0 and phase == 2):
                    lo = mid + 1
                    st_llcp[g] = lcp
                else:
                    hi = mid
                    st_hlcp[g] = lcp
                if lo >= hi:
                    if phase == 0:  # no suffix starts with q
                        lo_NxS[i, s] = lo
                        hi_NxS[i, s] = lo
                        live[g] = False
                    elif phase == 1:  # lower bound found; now the upper one, brackets (m, saved hlcp)
                        lo_NxS[i, s] = lo
                        lo = st_up_lo[g]
                        hi = st_up_hi[g]
                        st_llcp[g] = qe - qs
                        st_hlcp[g] = st_up_hlcp[g]
                        st_phase[g] = 2
                        if lo >= hi:
                            hi_NxS[i, s] = lo
                            live[g] = False
                    else:
                        hi_NxS[i, s] = lo
                        live[g] = False
                st_lo[g] = lo
                st_hi[g] = hi
                if live[g]:
                    _prefetch(sa_u8, ((s0 + ((lo + hi) >> 1)) * bits) >> 3)
                    continue
                n_live -= 1
            while task < n_tasks:  # a free lane takes the next (query, shard) whose block is not empty
                i = todo_T[task // n_shards]
                s = task - (task // n_shards) * n_shards
                task += 1
                t = q_flat[qs_N[i]]
                lo = bucket_SxV2[s, t]
                hi = bucket_SxV2[s, t + 1]
                if lo == hi:
                    lo_NxS[i, s] = lo
                    hi_NxS[i, s] = lo
                    continue
                lo, hi, llcp, hlcp, mlo, mhi = _narrow(fence_F, shard_starts_S1[s], lo, hi, q_flat, qs_N[i], qe_N[i])
                if mlo >= 0:  # fence samples start with q: bisect the two gaps around them, no shared phase
                    m = qe_N[i] - qs_N[i]
                    if lo < mlo:
                        _lane_start(sa_u8, bits, g, i, s, lo, mlo, llcp, m, shard_starts_S1[s], st_lo, st_hi, st_llcp,
                                    st_hlcp, st_phase, st_pos, st_query, st_shard)
                        st_phase[g] = 1
                        st_up_lo[g] = mhi + 1
                        st_up_hi[g] = hi
                        st_up_hlcp[g] = hlcp
                    else:
                        lo_NxS[i, s] = lo
                        if mhi + 1 >= hi:
                            hi_NxS[i, s] = hi
                            continue
                        _lane_start(sa_u8, bits, g, i, s, mhi + 1, hi, m, hlcp, shard_starts_S1[s], st_lo, st_hi,
                                    st_llcp, st_hlcp, st_phase, st_pos, st_query, st_shard)
                        st_phase[g] = 2
                elif lo >= hi:
                    lo_NxS[i, s] = lo
                    hi_NxS[i, s] = lo
                    continue
                else:
                    _lane_start(sa_u8, bits, g, i, s, lo, hi, llcp, hlcp, shard_starts_S1[s], st_lo, st_hi, st_llcp,
                                st_hlcp, st_phase, st_pos, st_query, st_shard)
                live[g] = True
                n_live += 1
                break


@njit(**_JIT)
def _plan_batch(q_flat, q_offsets_N1, order_N, bucket_SxV2, lo_NxS, hi_NxS):
    """First pass over a batch in ``order_N``: answers what needs no search (a token outside the
    vocabulary: empty; 0 or 1 tokens: the first-token blocks), marks a repeat of the previous query
    (``dup_N[i]`` = the query it repeats, else -1) and returns (queries to search, dup_N)."""
    n = len(q_offsets_N1) - 1
    sep = bucket_SxV2.shape[1] - 2
    todo = np.empty(n, np.int64)
    n_todo = 0
    dup_N = np.full(n, -1, np.int64)
    prev = np.int64(-1)
    for k in range(n):
        i = order_N[k]
        qs = q_offsets_N1[i]
        qe = q_offsets_N1[i + 1]
        if not _in_vocab(q_flat, qs, qe, sep):
            continue
        if prev >= 0 and _same_query(q_flat, q_offsets_N1[prev], q_offsets_N1[prev + 1], qs, qe):
            dup_N[i] = prev if dup_N[prev] < 0 else dup_N[prev]
        elif qe - qs == 0:
            for s in range(lo_NxS.shape[1]):
                hi_NxS[i, s] = bucket_SxV2[s, sep]
        elif qe - qs == 1:
            for s in range(lo_NxS.shape[1]):
                lo_NxS[i, s] = bucket_SxV2[s, q_flat[qs]]
                hi_NxS[i, s] = bucket_SxV2[s, q_flat[qs] + 1]
        else:
            todo[n_todo] = i
            n_todo += 1
        prev = i
    return todo[:n_todo], dup_N


@njit(**_JIT)
def ranges_batch(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, q_offsets_N1, order_N):
    """Per query and shard, the SA range [lo, hi) of the query; a query with a token outside the
    vocabulary gets empty ranges. Queries are searched in ``order_N`` (a permutation of 0..N-1:
    sorted queries share cached search paths, and a repeat of the previous one is not searched)."""
    n = len(q_offsets_N1) - 1
    n_shards = len(shard_starts_S1) - 1
    lo_NxS = np.zeros((n, n_shards), np.int64)
    hi_NxS = np.zeros((n, n_shards), np.int64)
    todo, dup_N = _plan_batch(q_flat, q_offsets_N1, order_N, bucket_SxV2, lo_NxS, hi_NxS)
    _ranges_lanes(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, q_offsets_N1[:-1],
                  q_offsets_N1[1:], todo, lo_NxS, hi_NxS)
    for i in range(n):
        if dup_N[i] >= 0:
            lo_NxS[i] = lo_NxS[dup_N[i]]
            hi_NxS[i] = hi_NxS[dup_N[i]]
    return lo_NxS, hi_NxS


@njit(**_JIT)
def count_batch(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, q_offsets_N1, order_N):
    """Counts of N queries (see ``ranges_batch``)."""
    lo_NxS, hi_NxS = ranges_batch(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, q_offsets_N1,
                                  order_N)
    out_N = np.zeros(len(q_offsets_N1) - 1, np.int64)
    for i in range(len(out_N)):
        for s in range(lo_NxS.shape[1]):
            out_N[i] += hi_NxS[i, s] - lo_NxS[i, s]
    return out_N


@njit(**_JIT)
def count_batch_sorted(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, q_offsets_N1):
    """``count_batch`` with the queries sorted by ``search_keys`` and copied into that order first:
    reading queries through a permutation costs a cache miss per query, more than the copy."""
    n = len(q_offsets_N1) - 1
    order_N = np.argsort(search_keys(q_flat, q_offsets_N1, bucket_SxV2.shape[1] - 2))
    sorted_flat = np.empty(len(q_flat), np.int64)
    sorted_offsets = np.zeros(n + 1, np.int64)
    j = 0
    for k in range(n):
        i = order_N[k]
        for x in range(q_offsets_N1[i], q_offsets_N1[i + 1]):
            sorted_flat[j] = q_flat[x]
            j += 1
        sorted_offsets[k + 1] = j
    counts = count_batch(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, sorted_flat, sorted_offsets,
                         np.arange(n))
    out_N = np.empty(n, np.int64)
    for k in range(n):
        out_N[order_N[k]] = counts[k]
    return out_N


@njit(inline="always", **_JIT)
def _doc_of(doc_starts_D1, gpos):
    """Document id holding global token position ``gpos`` (doc d spans [starts[d], starts[d+1]))."""
    return np.searchsorted(doc_starts_D1, gpos, side="right") - 1


@njit(**_JIT)
def gather_positions(sa_u8, bits, shard_starts_S1, doc_starts_D1, lo_NxS, hi_NxS, take_N, seed_frac,
                     out_offsets_N1, want_offsets):
    """Fills, for query i, ``take_N[i]`` occurrences from its ranges: all of them in shard/rank
    order when ``take >= total``, else a stratified deterministic sample of the concatenated ranges
    (rank j of ``take`` is ``floor((j + seed_frac) * total / take)``). Returns (doc_ids, offsets)."""
    n = lo_NxS.shape[0]
    n_shards = lo_NxS.shape[1]
    base0 = out_offsets_N1[0]
    docs = np.empty(out_offsets_N1[n] - base0, np.int64)
    offs = np.empty(out_offsets_N1[n] - base0 if want_offsets else 0, np.int64)
    for i in range(n):
        total = np.int64(0)
        for s in range(n_shards):
            total += hi_NxS[i, s] - lo_NxS[i, s]
        take = take_N[i]
        base = out_offsets_N1[i] - base0
        s = 0
        skipped = np.int64(0)  # ranks of the concatenated range in shards before s
        for j in range(take):
            if take >= total:
                g = np.int64(j)
            else:
                g = np.int64((j + seed_frac) * total / take)
            while g - skipped >= hi_NxS[i, s] - lo_NxS[i, s]:
                skipped += hi_NxS[i, s] - lo_NxS[i, s]
                s += 1
            r = lo_NxS[i, s] + g - skipped
            gpos = shard_starts_S1[s] + _sa_at(sa_u8, bits, shard_starts_S1[s] + r)
            d = _doc_of(doc_starts_D1, gpos)
            docs[base + j] = d
            if want_offsets:
                offs[base + j] = gpos - doc_starts_D1[d]
    return docs, offs


@njit(**_JIT)
def _longest_into(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, qs, qe, limit_L, out_L):
    """out_L[i] = longest prefix of q[qs+i : qs+limit_L[i]] occurring in the corpus: per position
    and shard one lower-bound search in the first token's block (the larger bracket LCP at its end
    is the match), LANES of them interleaved as in ``_ranges_lanes``."""
    n_shards = len(shard_starts_S1) - 1
    st_lo = np.zeros(LANES, np.int64)
    st_hi = np.zeros(LANES, np.int64)
    st_llcp = np.zeros(LANES, np.int64)
    st_hlcp = np.zeros(LANES, np.int64)
    st_pos = np.zeros(LANES, np.int64)
    st_query = np.zeros(LANES, np.int64)
    st_shard = np.zeros(LANES, np.int64)
    st_phase = np.zeros(LANES, np.int64)  # unused: a lower bound has one phase
    live = np.zeros(LANES, np.bool_)
    out_L[:] = 0
    n_tasks = (qe - qs) * n_shards
    task = 0
    n_live = 0
    first_round = True
    while first_round or n_live > 0:
        first_round = False
        for g in range(LANES):
            if live[g]:
                i = st_query[g]
                s = st_shard[g]
                s0 = shard_starts_S1[s]
                lo = st_lo[g]
                hi = st_hi[g]
                mid = (lo + hi) >> 1
                k0 = st_llcp[g] if st_llcp[g] < st_hlcp[g] else st_hlcp[g]
                if st_pos[g] < 0:
                    pos = s0 + _sa_at(sa_u8, bits, s0 + mid)
                    st_pos[g] = pos
                    _prefetch(tokens, pos + k0)
                    continue
                c, lcp = _compare(tokens, st_pos[g], shard_starts_S1[s + 1], q, qs + i, qs + limit_L[i], k0)
                st_pos[g] = -1
                if c < 0:
                    lo = mid + 1
                    st_llcp[g] = lcp
                else:
                    hi = mid
                    st_hlcp[g] = lcp
                st_lo[g] = lo
                st_hi[g] = hi
                if lo < hi:
                    _prefetch(sa_u8, ((s0 + ((lo + hi) >> 1)) * bits) >> 3)
                    continue
                m = st_llcp[g] if st_llcp[g] > st_hlcp[g] else st_hlcp[g]
                if m > out_L[i]:
                    out_L[i] = m
                live[g] = False
                n_live -= 1
            while task < n_tasks:  # a free lane takes the next (position, shard) with a non-empty block
                i = task // n_shards
                s = task - i * n_shards
                task += 1
                if limit_L[i] <= i:  # the position holds an out-of-vocabulary token
                    continue
                t = q[qs + i]
                lo = bucket_SxV2[s, t]
                hi = bucket_SxV2[s, t + 1]
                if lo == hi:
                    continue
                if limit_L[i] == i + 1:  # one token left, and it occurs
                    out_L[i] = 1
                    continue
                lo, hi, llcp, hlcp, _, _ = _narrow(fence_F, shard_starts_S1[s], lo, hi, q, qs + i, qs + limit_L[i])
                if lo >= hi:  # q's first tokens fall between two suffixes: the brackets are the match
                    m = llcp if llcp > hlcp else hlcp
                    if m > out_L[i]:
                        out_L[i] = m
                    continue
                _lane_start(sa_u8, bits, g, i, s, lo, hi, llcp, hlcp, shard_starts_S1[s], st_lo, st_hi, st_llcp,
                            st_hlcp, st_phase, st_pos, st_query, st_shard)
                live[g] = True
                n_live += 1
                break


@njit(inline="always", **_JIT)
def _valid_limits(q, qs, qe, sep, limit_L):
    """limit_L[i] = offset (from qs) of the first out-of-vocabulary token at or after qs + i."""
    nxt = qe - qs
    for i in range(qe - qs - 1, -1, -1):
        t = q[qs + i]
        if t < 0 or t >= sep:
            nxt = i
        limit_L[i] = nxt


@njit(**_JIT)
def longest_batch(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, q_offsets_N1):
    """Longest corpus match starting at every position of every query: int32, flat over
    ``q_flat[q_offsets_N1[0]:q_offsets_N1[-1]]``."""
    base0 = q_offsets_N1[0]
    sep = bucket_SxV2.shape[1] - 2
    out = np.zeros(q_offsets_N1[-1] - base0, np.int64)
    for i in range(len(q_offsets_N1) - 1):
        qs = q_offsets_N1[i]
        qe = q_offsets_N1[i + 1]
        limit_L = np.empty(qe - qs, np.int64)
        _valid_limits(q_flat, qs, qe, sep, limit_L)
        _longest_into(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, qs, qe, limit_L,
                      out[qs - base0:qe - base0])
    return out.astype(np.int32)


@njit(**_JIT)
def maximal_batch(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, q_offsets_N1, min_len, logp_V):
    """Maximal matching spans (not contained in another) of length >= min_len for each query.

    Since ``i + longest[i]`` never decreases along a query, span ``[i, i + longest[i])`` is maximal
    iff its end is strictly beyond the previous position's. Returns per position (flat like q_flat)
    ``span_len`` (0 where no maximal span starts), ``span_count`` (its corpus count) and
    ``span_logp`` (the sum of ``logp_V`` over its tokens, left to right)."""
    base0 = q_offsets_N1[0]
    sep = bucket_SxV2.shape[1] - 2
    span_len = np.zeros(q_offsets_N1[-1] - base0, np.int64)
    span_count = np.zeros(q_offsets_N1[-1] - base0, np.int64)
    span_logp = np.zeros(q_offsets_N1[-1] - base0, np.float64)
    for i in range(len(q_offsets_N1) - 1):
        qs = q_offsets_N1[i]
        qe = q_offsets_N1[i + 1]
        limit_L = np.empty(qe - qs, np.int64)
        _valid_limits(q_flat, qs, qe, sep, limit_L)
        longest_L = np.empty(qe - qs, np.int64)
        _longest_into(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, qs, qe, limit_L, longest_L)
        _maximal_from_longest(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q_flat, qs, longest_L, 0,
                              qe - qs, min_len, logp_V, span_len[qs - base0:qe - base0],
                              span_count[qs - base0:qe - base0], span_logp[qs - base0:qe - base0])
    return span_len, span_count, span_logp


@njit(**_JIT)
def _maximal_from_longest(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, qs, longest_L, j0, j1, min_len,
                          logp_V, out_len, out_count, out_logp):
    """Maximal spans starting at query positions [j0, j1), from the whole query's longest matches;
    writes length / count / log-prob at index j - j0 (length 0: no maximal span starts there). The
    spans' counts are searched together, interleaved."""
    n_shards = len(shard_starts_S1) - 1
    span_qs = np.empty(j1 - j0, np.int64)
    span_qe = np.empty(j1 - j0, np.int64)
    todo = np.empty(j1 - j0, np.int64)
    lo_NxS = np.zeros((j1 - j0, n_shards), np.int64)
    hi_NxS = np.zeros((j1 - j0, n_shards), np.int64)
    n_todo = 0
    for j in range(j0, j1):
        ln = longest_L[j]
        prev_end = j - 1 + longest_L[j - 1] if j > 0 else np.int64(-1)
        if ln > 0 and j + ln > prev_end and ln >= min_len:
            out_len[j - j0] = ln
            span_qs[j - j0] = qs + j
            span_qe[j - j0] = qs + j + ln
            if ln == 1:
                for s in range(n_shards):
                    lo_NxS[j - j0, s] = bucket_SxV2[s, q[qs + j]]
                    hi_NxS[j - j0, s] = bucket_SxV2[s, q[qs + j] + 1]
            else:
                todo[n_todo] = j - j0
                n_todo += 1
            lp = 0.0
            for k in range(qs + j, qs + j + ln):
                lp += logp_V[q[k]]
            out_logp[j - j0] = lp
    _ranges_lanes(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, span_qs, span_qe, todo[:n_todo],
                  lo_NxS, hi_NxS)
    for j in range(j1 - j0):
        if out_len[j] > 0:
            c = np.int64(0)
            for s in range(n_shards):
                c += hi_NxS[j, s] - lo_NxS[j, s]
            out_count[j] = c


@njit(**_JIT)
def longest_slice(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, p0, p1):
    """Longest matches at positions [p0, p1) of one query q (int64[L]): int64[p1 - p0]. Lets one
    long query be split across threads."""
    limit_L = np.empty(len(q), np.int64)
    _valid_limits(q, 0, len(q), bucket_SxV2.shape[1] - 2, limit_L)
    out = np.zeros(p1 - p0, np.int64)
    _longest_into(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, p0, p1, limit_L[p0:p1] - p0, out)
    return out


@njit(**_JIT)
def maximal_slice(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, longest_L, j0, j1, min_len, logp_V):
    """Maximal spans of one query starting at positions [j0, j1), given its longest matches."""
    out_len = np.zeros(j1 - j0, np.int64)
    out_count = np.zeros(j1 - j0, np.int64)
    out_logp = np.zeros(j1 - j0, np.float64)
    _maximal_from_longest(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q, 0, longest_L, j0, j1, min_len,
                          logp_V, out_len, out_count, out_logp)
    return out_len, out_count, out_logp


@njit(**_JIT)
def _next_runs(tokens, sa_u8, bits, s0, s1, sep, m, lo, hi, tok_out, cnt_out, n_out):
    """Appends (next token, count) runs of SA range [lo, hi) of a length-m context: the next tokens
    are sorted inside the range, so each run's end is found by galloping then binary search."""
    r = lo
    while r < hi:
        p = s0 + _sa_at(sa_u8, bits, s0 + r) + m
        if p >= s1:  # suffix ends with the context (cannot happen: every document ends with sep)
            r += 1
            continue
        t = tokens[p]
        if t == sep:  # end-of-document suffixes sort last in the range
            break
        a = r  # last rank known to have next token t
        step = np.int64(1)
        b = r + 1
        while b < hi and tokens[s0 + _sa_at(sa_u8, bits, s0 + b) + m] == t:
            a = b
            step <<= 1
            b = r + step
        if b > hi:
            b = hi
        while b - a > 1:  # tokens at a == t, at b != t (or b == hi)
            mid = (a + b) >> 1
            if tokens[s0 + _sa_at(sa_u8, bits, s0 + mid) + m] == t:
                a = mid
            else:
                b = mid
        tok_out[n_out] = t
        cnt_out[n_out] = b - r
        n_out += 1
        r = b
    return n_out


@njit(**_JIT)
def _merge_runs(tok, cnt, a, b):
    """Sorts the (token, count) runs in [a, b) by token and sums equal tokens (runs of different
    shards); returns the new end of the segment."""
    order = np.argsort(tok[a:b], kind="mergesort")
    t = tok[a:b][order]
    c = cnt[a:b][order]
    k = a - 1
    for j in range(b - a):
        if k >= a and t[j] == tok[k]:
            cnt[k] += c[j]
        else:
            k += 1
            tok[k] = t[j]
            cnt[k] = c[j]
    return k + 1


@njit(**_JIT)
def next_counts_one(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, q):
    """Every token following context q (int64[M]) and its count, ascending by token id."""
    sep = bucket_SxV2.shape[1] - 2
    if not _in_vocab(q, 0, len(q), sep):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n_shards = len(shard_starts_S1) - 1
    los = np.empty(n_shards, np.int64)
    his = np.empty(n_shards, np.int64)
    cap = np.int64(0)
    for s in range(n_shards):
        lo, hi = _shard_range(tokens, sa_u8, bits, shard_starts_S1, bucket_SxV2, fence_F, s, q, 0, len(q))
        los[s] = lo
        his[s] = hi
        cap += min(hi - lo, sep)
    tok = np.empty(cap, np.int64)
    cnt = np.empty(cap, np.int64)
    n_out = np.int64(0)
    for s in range(n_shards):
        n_out = _next_runs(tokens, sa_u8, bits, shard_starts_S1[s], shard_starts_S1[s + 1], sep, len(q),
                           los[s], his[s], tok, cnt, n_out)
    if n_shards > 1:
        n_out = _merge_runs(tok, cnt, 0, n_out)
    return tok[:n_out].copy(), cnt[:n_out].copy()


@njit(**_JIT)
def next_runs_fill(tokens, sa_u8, bits, shard_starts_S1, sep, q_offsets_N1, lo_NxS, hi_NxS, cap_offsets_N1):
    """Writes each context's runs at its offset (room for every run), merged across shards; returns
    (token ids, counts, number of distinct next tokens per context)."""
    n = lo_NxS.shape[0]
    base0 = cap_offsets_N1[0]
    tok = np.empty(cap_offsets_N1[n] - base0, np.int64)
    cnt = np.empty(cap_offsets_N1[n] - base0, np.int64)
    distinct_N = np.zeros(n, np.int64)
    for i in range(n):
        m = q_offsets_N1[i + 1] - q_offsets_N1[i]
        c = cap_offsets_N1[i] - base0
        for s in range(lo_NxS.shape[1]):
            c = _next_runs(tokens, sa_u8, bits, shard_starts_S1[s], shard_starts_S1[s + 1], sep, m,
                           lo_NxS[i, s], hi_NxS[i, s], tok, cnt, c)
        if lo_NxS.shape[1] > 1:
            c = _merge_runs(tok, cnt, cap_offsets_N1[i] - base0, c)
        distinct_N[i] = c - (cap_offsets_N1[i] - base0)
    return tok, cnt, distinct_N


@njit(**_JIT)
def encode_bytes(tokens, first_b, second_b):
    """The shard's text in a byte code (``first_b[t]``, then ``second_b[t]`` unless it is -1), and
    which bytes start a code: ``starts_W`` (uint64 bitmap, bit x % 64 of word x // 64) with
    ``rank_W`` (codes starting before each word), so a code's token index is a rank query on
    ~1/6 byte per text byte that stays in cache, not a lookup in an int32 array per byte."""
    n = np.int64(0)
    for i in range(len(tokens)):
        n += 1 if second_b[tokens[i]] < 0 else 2
    text = np.empty(n, np.uint8)
    starts_W = np.zeros((n + 63) >> 6, np.uint64)
    j = 0
    for i in range(len(tokens)):
        t = tokens[i]
        text[j] = first_b[t]
        starts_W[j >> 6] |= np.uint64(1) << np.uint64(j & 63)
        j += 1
        if second_b[t] >= 0:
            text[j] = second_b[t]
            j += 1
    rank_W = np.empty(len(starts_W), np.int64)
    r = np.int64(0)
    for w in range(len(starts_W)):
        rank_W[w] = r
        r += _popcount(starts_W[w])
    return text, starts_W, rank_W


@njit(inline="always", **_JIT)
def _popcount(x):
    """Set bits of a uint64 (the SWAR idiom, which LLVM turns into one popcnt instruction)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(**_JIT)
def pack_suffix_array(sa, starts_W, rank_W, step, out_u8, g0, bits, keep0, keep1):
    """Bit-packs a suffix array computed over a shard's bytes into entries g0, g0 + 1, ... of
    ``out_u8`` (zero-filled). The token suffixes are the entries where a token's code starts, in
    order: with a code (``starts_W`` / ``rank_W`` of ``encode_bytes``, non-empty) the token index
    is the rank of the entry's start bit, else every ``step``-th byte is a token, at entry / step.

    Only bytes in [keep0, keep1) are written, so threads packing neighbouring shards never share
    a byte; an entry that touches a byte outside goes to the returned (index, value) list, for the
    caller to write once every thread has finished. Returns (edge_index int64[k], edge_value)."""
    mask = (np.int64(1) << bits) - 1
    edge_g = np.empty(64, np.int64)
    edge_v = np.empty(64, np.int64)
    n_edge = 0
    g = g0
    coded = len(starts_W) > 0
    for i in range(len(sa)):
        x = np.int64(sa[i])
        if coded:
            word = starts_W[x >> 6]
            b = np.uint64(x & 63)
            if not (word >> b) & np.uint64(1):
                continue
            v = rank_W[x >> 6] + _popcount(word & ((np.uint64(1) << b) - np.uint64(1)))
        else:
            if x % step != 0:
                continue
            v = x // step
        v &= mask
        bit = g * bits
        first = bit >> 3
        last = (bit + bits - 1) >> 3
        if first < keep0 or last >= keep1:
            if n_edge == len(edge_g):
                edge_g = np.concatenate((edge_g, edge_g))
                edge_v = np.concatenate((edge_v, edge_v))
            edge_g[n_edge] = g
            edge_v[n_edge] = v
            n_edge += 1
        else:
            w = v << (bit & 7)
            for b in range(first, last + 1):
                out_u8[b] |= np.uint8(w & 0xFF)
                w >>= 8
        g += 1
    return edge_g[:n_edge].copy(), edge_v[:n_edge].copy()


@njit(**_JIT)
def shard_counts(tokens_P, bounds_S1, num_symbols):
    """int32[S, num_symbols]: count of every token id (the separator included) in each shard."""
    out = np.zeros((len(bounds_S1) - 1, num_symbols), np.int32)
    for s in range(len(bounds_S1) - 1):
        for i in range(bounds_S1[s], bounds_S1[s + 1]):
            out[s, tokens_P[i]] += 1
    return out


@njit(nogil=True, cache=True)
def write_entries(out_u8, bits, g_K, v_K):
    """ORs entries (index g_K[k], value v_K[k]) into the zero-filled bit-packed ``out_u8``."""
    for k in range(len(g_K)):
        bit = g_K[k] * bits
        w = v_K[k] << (bit & 7)
        for b in range(bit >> 3, ((bit + bits - 1) >> 3) + 1):
            out_u8[b] |= np.uint8(w & 0xFF)
            w >>= 8
