"""Three independent 32-bit hashes of a token context, identical on the host (NumPy) and under ``jax.jit``.

The veto table is keyed by the tokens that precede a vetoed continuation. JAX runs with 32-bit types
by default (x64 stays off), so a 64-bit key is a ``(hi, lo)`` pair of uint32 lanes from two unrelated
mixers (MurmurHash3-style and xxHash32-style), searched lexicographically. A third lane (a
``lowbias32`` sponge) is stored beside every key and must also match before a lookup acts: a collision
of the 64-bit key alone is never acted on silently.

Suffix streaming. A context ``(c_1, ..., c_k)`` is absorbed from its LAST token backwards
(``c_k, c_{k-1}, ..., c_1``) and the length ``k`` is mixed in at finalization. Absorbing a running
sequence from its most recent token therefore yields the hashes of all its suffixes (k = 1, 2, ...)
in one pass of C steps, which is what a decoding step needs.

All arithmetic is uint32 with wrap-around, written once against an array module ``xp`` (``numpy``
or ``jax.numpy``) so host build and device lookup cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SEED_HI = 0x243F6A88
_SEED_LO = 0x85A308D3
_SEED_CHK = 0x13198A2E


def _u32(xp: Any, v: int) -> Any:
    return xp.uint32(v & 0xFFFFFFFF)


def _rotl(xp: Any, x: Any, r: int) -> Any:
    return (x << _u32(xp, r)) | (x >> _u32(xp, 32 - r))


def init_state(xp: Any, shape: tuple[int, ...]) -> tuple[Any, Any, Any]:
    """The three lane states before any token is absorbed, each uint32[shape]."""
    return (
        xp.full(shape, _SEED_HI, dtype=xp.uint32),
        xp.full(shape, _SEED_LO, dtype=xp.uint32),
        xp.full(shape, _SEED_CHK, dtype=xp.uint32),
    )


def absorb(xp: Any, state: tuple[Any, Any, Any], token: Any) -> tuple[Any, Any, Any]:
    """Absorbs one token (uint32, broadcastable to the state) into each lane."""
    hi, lo, chk = state
    t = token.astype(xp.uint32)
    # MurmurHash3 body for one 4-byte block.
    k = t * _u32(xp, 0xCC9E2D51)
    k = _rotl(xp, k, 15) * _u32(xp, 0x1B873593)
    hi = _rotl(xp, hi ^ k, 13) * _u32(xp, 5) + _u32(xp, 0xE6546B64)
    # xxHash32 tail step for one 4-byte lane.
    lo = _rotl(xp, lo + t * _u32(xp, 0xC2B2AE3D), 17) * _u32(xp, 0x27D4EB2F)
    # lowbias32 sponge: a different multiply/xor-shift family from the two above.
    c = chk ^ (t * _u32(xp, 0x9E3779B9) + _u32(xp, 0x7F4A7C15))
    c = (c ^ (c >> _u32(xp, 16))) * _u32(xp, 0x7FEB352D)
    c = (c ^ (c >> _u32(xp, 15))) * _u32(xp, 0x846CA68B)
    chk = c ^ (c >> _u32(xp, 16))
    return hi, lo, chk


def finalize(xp: Any, state: tuple[Any, Any, Any], length: Any) -> tuple[Any, Any, Any]:
    """Mixes the context length (tokens, uint32-broadcastable) in and avalanches each lane."""
    hi, lo, chk = state
    n = length.astype(xp.uint32) if hasattr(length, "astype") else _u32(xp, int(length))
    h = hi ^ (n * _u32(xp, 4))
    h = (h ^ (h >> _u32(xp, 16))) * _u32(xp, 0x85EBCA6B)
    h = (h ^ (h >> _u32(xp, 13))) * _u32(xp, 0xC2B2AE35)
    h = h ^ (h >> _u32(xp, 16))
    g = lo + n * _u32(xp, 0x165667B1)
    g = (g ^ (g >> _u32(xp, 15))) * _u32(xp, 0x85EBCA77)
    g = (g ^ (g >> _u32(xp, 13))) * _u32(xp, 0xC2B2AE3D)
    g = g ^ (g >> _u32(xp, 16))
    c = chk + n * _u32(xp, 0x632BE5AB)
    c = (c ^ (c >> _u32(xp, 17))) * _u32(xp, 0xED5AD4BB)
    c = (c ^ (c >> _u32(xp, 11))) * _u32(xp, 0xAC4C1B51)
    c = (c ^ (c >> _u32(xp, 15))) * _u32(xp, 0x31848BAB)
    c = c ^ (c >> _u32(xp, 14))
    return h, g, c


def hash_contexts_np(contexts_NxK: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host hashes of N contexts that all have K tokens: ``(hi, lo, chk)``, each uint32[N]."""
    contexts_NxK = np.asarray(contexts_NxK)
    n, k = contexts_NxK.shape
    toks = contexts_NxK.astype(np.uint32)
    state = init_state(np, (n,))
    with np.errstate(over="ignore"):
        for j in range(k - 1, -1, -1):
            state = absorb(np, state, toks[:, j])
        return finalize(np, state, np.full((n,), k, dtype=np.uint32))


def suffix_hashes(context_BxC: Any) -> tuple[Any, Any, Any]:
    """Device hashes of every suffix of right-aligned contexts (jittable).

    context_BxC: int32, the most recent token in column C-1. Returns ``(hi, lo, chk)``, each
    uint32[B, C], where column k-1 hashes the last k tokens (validity against a context length is
    the caller's business: padding columns are hashed like tokens, then ignored).
    """
    import jax.numpy as jnp

    b, c = context_BxC.shape
    toks = context_BxC.astype(jnp.uint32)
    state = init_state(jnp, (b,))
    his, los, chks = [], [], []
    for j in range(c):  # C is small and static (n_max - 1): an unrolled loop fuses into one kernel
        state = absorb(jnp, state, toks[:, c - 1 - j])
        h, g, k = finalize(jnp, state, jnp.uint32(j + 1))
        his.append(h)
        los.append(g)
        chks.append(k)
    return jnp.stack(his, axis=1), jnp.stack(los, axis=1), jnp.stack(chks, axis=1)
