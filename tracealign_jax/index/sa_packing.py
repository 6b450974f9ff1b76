"""Build-side kernels: byte coding of a shard's text, bit-packing its suffix array, token counts.

``build.py`` sorts each shard's text as bytes with libdivsufsort: with the alphabetic code the text
comes from ``encode_bytes`` (with a bitmap of where each token's code starts). ``pack_suffix_array``
keeps the byte suffixes where a token starts and bit-packs them as ``bits``-bit entries; entries
that share a byte with a neighbouring shard are written after all threads with ``write_entries``.
``shard_counts`` counts every token id per shard (the first-token block sizes).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from tracealign_jax.index.search_primitives import _JIT


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
