"""One query's suffix-array range in one shard (``_shard_range``) and its count over all shards.

``_shard_range`` bisects the query's first-token block, narrowed by the fence, with LCP brackets
(see ``search_primitives``): one shared bisection until a suffix starting with the query, then
the lower and the upper bound. ``count_one`` runs the shards' searches interleaved
(``interleaved_search._ranges_lanes``); ``next_tokens`` reuses ``_shard_range``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tracealign_jax.index.interleaved_search import _ranges_lanes
from tracealign_jax.index.search_primitives import _JIT, _compare, _in_vocab, _narrow, _sa_at


@njit(**_JIT)
def _bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, lo, hi, llcp, hlcp, upper):
    """Bisects shard ranks [lo, hi] with LCP brackets (``llcp`` shared by rank lo - 1, ``hlcp`` by
    rank hi). upper = 0: the first rank whose suffix is >= q as a prefix (lower bound: rank lo - 1 is
    before q, rank hi starts with q or is n). upper = 1: the first rank whose suffix sorts after every
    suffix starting with q (rank lo - 1 starts with q, so ``llcp`` = len(q); rank hi does not)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        k0 = llcp if llcp < hlcp else hlcp
        c, lcp = _compare(tokens, s0 + _sa_at(sa_u8, bits, s0 + mid), s1, q, qs, qe, k0)
        if c < upper:  # c < 0 for the lower bound, c <= 0 for the upper
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
        return (_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, lo, mlo, llcp, m, 0),
                _bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, mhi + 1, hi, m, hlcp, 1))
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
            return (_bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, lo, mid, llcp, m, 0),
                    _bound(tokens, sa_u8, bits, s0, s1, q, qs, qe, mid + 1, hi, m, hlcp, 1))
    return lo, lo


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
