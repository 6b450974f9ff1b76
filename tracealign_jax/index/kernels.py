"""Compiled suffix-array search kernels (numba, ``nogil``): every shard is searched inside one call.

Layout the kernels see (see ``format.py``): ``tokens`` is the whole token array (uint16/uint32,
every document followed by the separator ``sep`` = vocab size, the largest value, so suffixes sort in
numeric token order and no match can cross a document); ``sa_u8`` holds the suffix arrays of all
shards back to back, each entry a shard-local position packed little-endian into ``width`` bytes;
``shard_starts_S1`` (int64[S+1]) are the token offsets where shards begin (shard s covers tokens
``[shard_starts[s], shard_starts[s+1])`` and SA entries with the same indices).

Queries arrive as int64 arrays. Callers guarantee query tokens lie in ``[0, sep)``: a token outside
the vocabulary can never match and is handled before the kernels (or, in ``longest_matches``, by
cutting the query there), so a query can never match a separator.

Binary searches keep the LCP with both bracket ends (Manber-Myers ``min(llcp, hlcp)`` skip), so a
comparison starts where the known common prefix ends. At the end of a lower-bound search the two
LCPs are exactly the LCPs with the suffixes at ranks ``r - 1`` and ``r`` (``r`` the insertion point,
including ``r = 0`` and ``r = n``): the longest match needs nothing more.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_JIT = dict(nogil=True, cache=True)


@njit(inline="always", **_JIT)
def _sa_at(sa_u8, width, index):
    """Shard-local position stored at global SA index ``index`` (``width`` little-endian bytes)."""
    off = index * width
    v = np.int64(0)
    for b in range(width):
        v |= np.int64(sa_u8[off + b]) << (8 * b)
    return v


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


@njit(**_JIT)
def _lower_bound(tokens, sa_u8, width, s0, s1, q, qs, qe):
    """First shard rank whose suffix is >= q (as a prefix); returns (rank, lcp(rank-1), lcp(rank))."""
    lo = np.int64(0)
    hi = s1 - s0
    llcp = np.int64(0)
    hlcp = np.int64(0)
    while lo < hi:
        mid = (lo + hi) >> 1
        k0 = llcp if llcp < hlcp else hlcp
        c, lcp = _compare(tokens, s0 + _sa_at(sa_u8, width, s0 + mid), s1, q, qs, qe, k0)
        if c < 0:
            lo = mid + 1
            llcp = lcp
        else:
            hi = mid
            hlcp = lcp
    return lo, llcp, hlcp


@njit(**_JIT)
def _upper_bound(tokens, sa_u8, width, s0, s1, q, qs, qe, lo):
    """First shard rank >= lo whose suffix sorts after every suffix that starts with q, given that
    the suffix at rank lo - 1 starts with q (so it brackets the search with LCP m)."""
    hi = s1 - s0
    m = qe - qs
    llcp = m
    hlcp = np.int64(0)
    while lo < hi:
        mid = (lo + hi) >> 1
        k0 = llcp if llcp < hlcp else hlcp
        c, lcp = _compare(tokens, s0 + _sa_at(sa_u8, width, s0 + mid), s1, q, qs, qe, k0)
        if c <= 0:
            lo = mid + 1
            llcp = lcp
        else:
            hi = mid
            hlcp = lcp
    return lo


@njit(**_JIT)
def _shard_range(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, s, q, qs, qe):
    """[lo, hi) shard ranks whose suffixes start with q[qs:qe]; the empty query spans every
    non-separator suffix (separators sort last)."""
    s0 = shard_starts_S1[s]
    s1 = shard_starts_S1[s + 1]
    if qe == qs:
        return np.int64(0), s1 - s0 - shard_seps_S[s]
    lo, _, hlcp = _lower_bound(tokens, sa_u8, width, s0, s1, q, qs, qe)
    if lo == s1 - s0 or hlcp < qe - qs:  # the suffix at the insertion point does not start with q
        return lo, lo
    return lo, _upper_bound(tokens, sa_u8, width, s0, s1, q, qs, qe, lo + 1)


@njit(**_JIT)
def count_one(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, q):
    total = np.int64(0)
    for s in range(len(shard_starts_S1) - 1):
        lo, hi = _shard_range(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, s, q, 0, len(q))
        total += hi - lo
    return total


@njit(parallel=True, **_JIT)
def ranges_batch(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, q_flat, q_offsets_N1, valid_N):
    """Per query and shard, the SA range [lo, hi) of the query; invalid queries get empty ranges."""
    n = len(q_offsets_N1) - 1
    n_shards = len(shard_starts_S1) - 1
    lo_NxS = np.zeros((n, n_shards), np.int64)
    hi_NxS = np.zeros((n, n_shards), np.int64)
    for i in prange(n):
        if not valid_N[i]:
            continue
        for s in range(n_shards):
            lo, hi = _shard_range(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, s,
                                  q_flat, q_offsets_N1[i], q_offsets_N1[i + 1])
            lo_NxS[i, s] = lo
            hi_NxS[i, s] = hi
    return lo_NxS, hi_NxS


@njit(parallel=True, **_JIT)
def count_batch(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, q_flat, q_offsets_N1, valid_N):
    n = len(q_offsets_N1) - 1
    out_N = np.zeros(n, np.int64)
    for i in prange(n):
        if not valid_N[i]:
            continue
        total = np.int64(0)
        for s in range(len(shard_starts_S1) - 1):
            lo, hi = _shard_range(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, s,
                                  q_flat, q_offsets_N1[i], q_offsets_N1[i + 1])
            total += hi - lo
        out_N[i] = total
    return out_N


@njit(inline="always", **_JIT)
def _doc_of(doc_starts_D1, gpos):
    """Document id holding global token position ``gpos`` (doc d spans [starts[d], starts[d+1]))."""
    return np.searchsorted(doc_starts_D1, gpos, side="right") - 1


@njit(parallel=True, **_JIT)
def gather_positions(sa_u8, width, shard_starts_S1, doc_starts_D1, lo_NxS, hi_NxS, take_N, seed_frac,
                     out_offsets_N1, want_offsets):
    """Fills, for query i, ``take_N[i]`` occurrences from its ranges: all of them in shard/rank
    order when ``take >= total``, else a stratified deterministic sample of the concatenated ranges
    (rank j of ``take`` is ``floor((j + seed_frac) * total / take)``). Returns (doc_ids, offsets)."""
    n = lo_NxS.shape[0]
    n_shards = lo_NxS.shape[1]
    docs = np.empty(out_offsets_N1[n], np.int64)
    offs = np.empty(out_offsets_N1[n] if want_offsets else 0, np.int64)
    for i in prange(n):
        total = np.int64(0)
        for s in range(n_shards):
            total += hi_NxS[i, s] - lo_NxS[i, s]
        take = take_N[i]
        base = out_offsets_N1[i]
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
            gpos = shard_starts_S1[s] + _sa_at(sa_u8, width, shard_starts_S1[s] + r)
            d = _doc_of(doc_starts_D1, gpos)
            docs[base + j] = d
            if want_offsets:
                offs[base + j] = gpos - doc_starts_D1[d]
    return docs, offs


@njit(**_JIT)
def _longest_into(tokens, sa_u8, width, shard_starts_S1, q, qs, qe, limit_L, out_L):
    """out_L[i] = longest prefix of q[qs+i : qs+limit_L[i]] occurring in the corpus."""
    n_shards = len(shard_starts_S1) - 1
    for i in range(qe - qs):
        best = np.int64(0)
        end = qs + limit_L[i]
        if end > qs + i:
            for s in range(n_shards):
                _, llcp, hlcp = _lower_bound(tokens, sa_u8, width, shard_starts_S1[s], shard_starts_S1[s + 1],
                                             q, qs + i, end)
                m = llcp if llcp > hlcp else hlcp
                if m > best:
                    best = m
        out_L[i] = best


@njit(inline="always", **_JIT)
def _valid_limits(q, qs, qe, sep, limit_L):
    """limit_L[i] = offset (from qs) of the first out-of-vocabulary token at or after qs + i."""
    nxt = qe - qs
    for i in range(qe - qs - 1, -1, -1):
        t = q[qs + i]
        if t < 0 or t >= sep:
            nxt = i
        limit_L[i] = nxt


@njit(parallel=True, **_JIT)
def longest_batch(tokens, sa_u8, width, shard_starts_S1, sep, q_flat, q_offsets_N1):
    """Longest corpus match starting at every position of every query; int32 flat like q_flat."""
    out = np.zeros(len(q_flat), np.int64)
    for i in prange(len(q_offsets_N1) - 1):
        qs = q_offsets_N1[i]
        qe = q_offsets_N1[i + 1]
        limit_L = np.empty(qe - qs, np.int64)
        _valid_limits(q_flat, qs, qe, sep, limit_L)
        _longest_into(tokens, sa_u8, width, shard_starts_S1, q_flat, qs, qe, limit_L, out[qs:qe])
    return out.astype(np.int32)


@njit(parallel=True, **_JIT)
def maximal_batch(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, sep, q_flat, q_offsets_N1, min_len):
    """Maximal matching spans (not contained in another) of length >= min_len for each query.

    Since ``i + longest[i]`` never decreases along a query, span ``[i, i + longest[i])`` is maximal
    iff its end is strictly beyond the previous position's. Returns per position (flat like q_flat)
    ``span_len`` (0 where no maximal span starts) and ``span_count`` (its corpus count)."""
    span_len = np.zeros(len(q_flat), np.int64)
    span_count = np.zeros(len(q_flat), np.int64)
    for i in prange(len(q_offsets_N1) - 1):
        qs = q_offsets_N1[i]
        qe = q_offsets_N1[i + 1]
        limit_L = np.empty(qe - qs, np.int64)
        _valid_limits(q_flat, qs, qe, sep, limit_L)
        longest_L = np.empty(qe - qs, np.int64)
        _longest_into(tokens, sa_u8, width, shard_starts_S1, q_flat, qs, qe, limit_L, longest_L)
        prev_end = np.int64(-1)
        for j in range(qe - qs):
            ln = longest_L[j]
            if ln > 0 and j + ln > prev_end and ln >= min_len:
                span_len[qs + j] = ln
                c = np.int64(0)
                for s in range(len(shard_starts_S1) - 1):
                    lo, hi = _shard_range(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, s,
                                          q_flat, qs + j, qs + j + ln)
                    c += hi - lo
                span_count[qs + j] = c
            if ln > 0 and j + ln > prev_end:
                prev_end = j + ln
    return span_len, span_count


@njit(**_JIT)
def _next_runs(tokens, sa_u8, width, s0, s1, sep, m, lo, hi, tok_out, cnt_out, n_out):
    """Appends (next token, count) runs of SA range [lo, hi) of a length-m context: the next tokens
    are sorted inside the range, so each run's end is found by galloping then binary search."""
    r = lo
    while r < hi:
        p = s0 + _sa_at(sa_u8, width, s0 + r) + m
        if p >= s1:  # suffix ends with the context (cannot happen: every document ends with sep)
            r += 1
            continue
        t = tokens[p]
        if t == sep:  # end-of-document suffixes sort last in the range
            break
        a = r  # last rank known to have next token t
        step = np.int64(1)
        b = r + 1
        while b < hi and tokens[s0 + _sa_at(sa_u8, width, s0 + b) + m] == t:
            a = b
            step <<= 1
            b = r + step
        if b > hi:
            b = hi
        while b - a > 1:  # tokens at a == t, at b != t (or b == hi)
            mid = (a + b) >> 1
            if tokens[s0 + _sa_at(sa_u8, width, s0 + mid) + m] == t:
                a = mid
            else:
                b = mid
        tok_out[n_out] = t
        cnt_out[n_out] = b - r
        n_out += 1
        r = b
    return n_out


@njit(**_JIT)
def _next_counts_one(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, sep, vocab, q, qs, qe):
    n_shards = len(shard_starts_S1) - 1
    m = qe - qs
    los = np.empty(n_shards, np.int64)
    his = np.empty(n_shards, np.int64)
    cap = np.int64(0)
    for s in range(n_shards):
        lo, hi = _shard_range(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, s, q, qs, qe)
        los[s] = lo
        his[s] = hi
        cap += min(hi - lo, vocab)
    tok = np.empty(cap, np.int64)
    cnt = np.empty(cap, np.int64)
    n_out = np.int64(0)
    for s in range(n_shards):
        n_out = _next_runs(tokens, sa_u8, width, shard_starts_S1[s], shard_starts_S1[s + 1], sep, m,
                           los[s], his[s], tok, cnt, n_out)
    tok = tok[:n_out]
    cnt = cnt[:n_out]
    if n_shards == 1:
        return tok, cnt
    order = np.argsort(tok, kind="mergesort")
    tok = tok[order]
    cnt = cnt[order]
    k = np.int64(-1)
    for j in range(n_out):
        if k >= 0 and tok[j] == tok[k]:
            cnt[k] += cnt[j]
        else:
            k += 1
            tok[k] = tok[j]
            cnt[k] = cnt[j]
    return tok[:k + 1].copy(), cnt[:k + 1].copy()


@njit(**_JIT)
def next_counts_one(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, sep, vocab, q):
    return _next_counts_one(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, sep, vocab, q, 0, len(q))


@njit(parallel=True, **_JIT)
def next_counts_batch(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, sep, vocab, q_flat, q_offsets_N1,
                      valid_N):
    """Exact next-token counts for each context; returns CSR (offsets_N1, token ids, counts)."""
    n = len(q_offsets_N1) - 1
    toks = [np.empty(0, np.int64) for _ in range(n)]
    cnts = [np.empty(0, np.int64) for _ in range(n)]
    for i in prange(n):
        if valid_N[i]:
            t, c = _next_counts_one(tokens, sa_u8, width, shard_starts_S1, shard_seps_S, sep, vocab,
                                    q_flat, q_offsets_N1[i], q_offsets_N1[i + 1])
            toks[i] = t
            cnts[i] = c
    offsets_N1 = np.zeros(n + 1, np.int64)
    for i in range(n):
        offsets_N1[i + 1] = offsets_N1[i] + len(toks[i])
    tok_flat = np.empty(offsets_N1[n], np.int64)
    cnt_flat = np.empty(offsets_N1[n], np.int64)
    for i in range(n):
        tok_flat[offsets_N1[i]:offsets_N1[i + 1]] = toks[i]
        cnt_flat[offsets_N1[i]:offsets_N1[i + 1]] = cnts[i]
    return offsets_N1, tok_flat, cnt_flat


@njit(nogil=True, cache=True)
def pack_suffix_array(sa, out_u8, width):
    """Writes int32 suffix-array entries into ``out_u8`` as ``width``-byte little-endian integers."""
    for i in range(len(sa)):
        v = np.int64(sa[i])
        for b in range(width):
            out_u8[i * width + b] = (v >> (8 * b)) & 0xFF
