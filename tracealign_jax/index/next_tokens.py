"""Next-token counts: every token following a context in the corpus, with its count.

Inside a context's SA range the next tokens are sorted, so ``_next_runs`` reads (token, count) runs
by galloping; ``_merge_runs`` sums the runs of different shards. ``next_counts_one`` searches one
context (``single_search._shard_range``); ``next_runs_fill`` takes ranges already found in batch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tracealign_jax.index.search_primitives import _JIT, _in_vocab, _sa_at
from tracealign_jax.index.single_search import _shard_range


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
