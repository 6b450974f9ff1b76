"""Batched suffix-array searches, LANES of them in flight at once with prefetch (numba, ``nogil``).

``_ranges_lanes`` is the interleaved state machine that finds (query, shard) ranges; on top of it
``ranges_batch`` / ``count_batch`` / ``count_batch_sorted`` (queries ordered by ``search_keys``,
repeats searched once) and ``gather_positions`` (documents and offsets of occurrences from the
ranges). Batched kernels take absolute offsets into the flat query array and return results for
that slice only, so the caller can split a batch across threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tracealign_jax.index.search_primitives import _JIT, _compare, _in_vocab, _narrow, _prefetch, _sa_at


# Searches interleaved by the batched kernels: enough that the prefetch issued for one lane has
# landed by the time the round comes back to it (a cache miss is ~100 ns, a lane step ~10 ns).
LANES = 16


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
