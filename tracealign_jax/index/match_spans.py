"""Longest corpus match at every query position, and the maximal matching spans built from them.

``_longest_into`` runs one lower-bound search per (position, shard), LANES interleaved as in
``interleaved_search``; the larger LCP bracket at its end is the match (see ``search_primitives``).
``_maximal_from_longest`` keeps the spans not contained in another and counts them together.
``*_batch`` kernels take many queries, ``*_slice`` kernels a position range of one long query.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tracealign_jax.index.interleaved_search import LANES, _lane_start, _ranges_lanes
from tracealign_jax.index.search_primitives import _JIT, _compare, _narrow, _prefetch, _sa_at


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
