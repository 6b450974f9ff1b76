"""The provenance veto table's device layout and its jittable lookup (no host machinery imported).

Compiled once on the host and saved / loaded by ``veto.store``; looked up here under ``jax.jit``
with no callback.

For every high-BCI corpus span ``s = (s_1..s_m)`` (n_min <= m <= n_max) and every k = 1..m-1, the
context ``(s_1..s_k)`` maps to the next token ``s_{k+1}`` with penalty w_k(s) x BCI(s) (nats): a
generation whose last k tokens equal that context would extend the span with that token. The entry
weight w_k is 1 by default; ``veto_build`` passes the conflict of the prefix ``(s_1..s_{k+1})``, so the
penalty is the BCI the continuation is expected to yield (see there). Duplicate
(context, next token) pairs keep the largest penalty; each context keeps at most ``max_entries``
next tokens (the highest penalties).

Layout (flat, device-ready, sorted lexicographically by ``(hi, lo, chk)``):
  ctx_hi_N, ctx_lo_N, ctx_chk_N   uint32[N]   the three context hashes (see ``context_hash``)
  offsets_N1                      int32[N+1]  CSR row pointers into the entry arrays
  next_tokens_M                   int32[M]    next-token ids
  penalties_M                     float32[M]  penalties, BCI in nats (> 0)
plus static ints ``context_len`` (= n_max - 1), ``max_entries`` and ``hi_run`` (the longest run of
equal ``hi`` values, so a lookup inspects a fixed window after ``jnp.searchsorted``). A lookup acts
on a context only if all three 32-bit hashes match.

Lookups take RIGHT-ALIGNED contexts: ``context_BxC`` int32 holds each row's most recent token in
column C-1; ``context_len_B`` int32 says how many trailing columns are real (the rest is padding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from tracealign_jax.veto import context_hash

ARRAYS = {  # array fields and their dtypes (the saved files, in ``veto.store``)
    "ctx_hi": np.uint32, "ctx_lo": np.uint32, "ctx_chk": np.uint32,
    "offsets": np.int32, "next_tokens": np.int32, "penalties": np.float32,
}


class VetoTable(struct.PyTreeNode):
    """Device arrays of the veto table (see module docstring); static ints live in the treedef."""

    ctx_hi: jax.Array
    ctx_lo: jax.Array
    ctx_chk: jax.Array
    offsets: jax.Array
    next_tokens: jax.Array
    penalties: jax.Array
    context_len: int = struct.field(pytree_node=False, default=1)
    max_entries: int = struct.field(pytree_node=False, default=1)
    hi_run: int = struct.field(pytree_node=False, default=1)

    @property
    def num_contexts(self) -> int:
        return int(self.ctx_hi.shape[0])

    @property
    def num_entries(self) -> int:
        return int(self.offsets[-1])

    def nbytes(self) -> int:
        return sum(int(np.asarray(getattr(self, n)).nbytes) for n in ARRAYS)


_BUCKET_STEPS = 4
"""Binary-search steps inside one directory bucket: buckets of up to 2^4 - 1 contexts are searched
directly; a query whose bucket is larger (never seen with uniform hashes) takes the full search."""


def _directory_bits(n: int) -> int:
    """Directory size 2^b for N contexts: about two contexts per bucket on average."""
    return min(max(int(n).bit_length() - 1, 1), 24)


def bucket_directory(table: VetoTable) -> jax.Array:
    """int32[2^b + 1], ``dir[j]`` = how many contexts have a ``ctx_hi`` whose top b bits are < j.

    Jittable, O(N + 2^b): a histogram and a prefix sum. Built once per decode call, outside the
    decoding loop; ``veto_candidates(..., directory=)`` then finds a key with one directory read and
    a few steps inside its bucket instead of log2(N) dependent reads across the whole table.
    The prefix sum is ``jnp.cumsum`` (XLA picks the scan per backend): ``lax.associative_scan`` over
    the 2^23 buckets of a 2^24-context table unrolls into a slice / pad cascade that libtpu's backend
    did not finish compiling in 85 min (8B decode) and 300 s (one 16-step loop; 15 s with cumsum).
    """
    return _directory(table.ctx_hi)


def _directory(sorted_hi: jax.Array) -> jax.Array:
    b = _directory_bits(sorted_hi.shape[0])
    bucket = (sorted_hi >> jnp.uint32(32 - b)).astype(jnp.int32)
    counts = jnp.zeros(2**b, jnp.int32).at[bucket].add(1, indices_are_sorted=True)
    return jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])


def _bounded_search(sorted_N: jax.Array, q: jax.Array, lo: jax.Array, hi: jax.Array, steps: int) -> jax.Array:
    """Smallest pos in [lo, hi] with every element of [lo, pos) < q, for hi - lo < 2^steps (int32).
    A branchless, unrolled binary search: straight-line gathers, no ``while`` loop to dispatch."""
    n = sorted_N.shape[0]
    pos = lo
    for bit in reversed(range(steps)):
        cand = pos + (1 << bit)
        take = (cand <= hi) & (sorted_N[jnp.clip(cand - 1, 0, n - 1)] < q)
        pos = jnp.where(take, cand, pos)
    return pos


def _lower_bound(sorted_hi: jax.Array, q_hi: jax.Array, directory: jax.Array | None) -> jax.Array:
    """``searchsorted(sorted_hi, q_hi, side="left")`` (int32), through ``directory`` when given."""
    if directory is None:
        return jnp.searchsorted(sorted_hi, q_hi, side="left").astype(jnp.int32)
    n = sorted_hi.shape[0]
    b = int(directory.shape[0] - 1).bit_length() - 1
    j = (q_hi >> jnp.uint32(32 - b)).astype(jnp.int32)
    lo, hi = directory[j], directory[j + 1]
    # Everything before the bucket is < q and everything after it > q: searching the bucket is exact.
    small = jnp.all(hi - lo < 2**_BUCKET_STEPS)
    return jax.lax.cond(small, lambda: _bounded_search(sorted_hi, q_hi, lo, hi, _BUCKET_STEPS),
                        lambda: _bounded_search(sorted_hi, q_hi, jnp.zeros_like(lo), jnp.full_like(lo, n),
                                                int(n).bit_length()))


def veto_candidates(table: VetoTable, context_BxC: jax.Array, context_len_B: jax.Array, min_prefix: int = 1,
                    directory: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The raw lookup slots of each row, before deduplication (what a decoding step needs).

    Same arguments as ``veto_entries``. Returns ``(token_ids_BxM int32, penalties_BxM float32,
    valid_BxM bool)`` with M = S x max_entries, S = number of suffix lengths k = min_prefix..C: slot
    ``s * max_entries + e`` is entry e of the context formed by the last ``min_prefix + s`` tokens.
    Within one suffix length tokens are distinct; across suffix lengths a token may repeat (with
    its own penalty). Invalid slots hold token 0, penalty 0. ``veto_entries`` = these slots, one per
    token with the max penalty, sorted; a consumer that tolerates repeats (a max/min scatter, a
    threshold test) skips that sort, which costs more than the lookup itself on CPU, and one that
    needs each token once but not sorted (a sum over entries) uses ``unique_slots``.
    directory: ``bucket_directory(table)`` to find keys in a few steps (same result), or None for
    a binary search over the whole table. Jittable; ``min_prefix`` is static.
    """
    c = min(context_BxC.shape[1], table.context_len)
    context_BxC = context_BxC[:, context_BxC.shape[1] - c:].astype(jnp.int32)
    ks = list(range(max(min_prefix, 1), c + 1))
    b = context_BxC.shape[0]
    if not ks:
        z = jnp.zeros((b, 0))
        return z.astype(jnp.int32), z.astype(jnp.float32), z.astype(bool)
    hi_BxC, lo_BxC, chk_BxC = context_hash.suffix_hashes(context_BxC)
    sel = np.asarray(ks) - 1
    q_hi, q_lo, q_chk = hi_BxC[:, sel], lo_BxC[:, sel], chk_BxC[:, sel]  # [B, K]
    k_ok = jnp.asarray(ks, jnp.int32)[None, :] <= context_len_B.astype(jnp.int32)[:, None]
    n_ctx = table.ctx_hi.shape[0]
    pos = _lower_bound(table.ctx_hi, q_hi, directory)
    found = jnp.zeros(q_hi.shape, bool)
    row = jnp.zeros(q_hi.shape, jnp.int32)
    for w in range(table.hi_run):  # equal-`hi` runs are at most hi_run long: a fixed window finds the key
        idx = jnp.minimum(pos + w, n_ctx - 1)
        hit = (pos + w < n_ctx) & (table.ctx_hi[idx] == q_hi) & (table.ctx_lo[idx] == q_lo) & (table.ctx_chk[idx] == q_chk)
        found = found | hit
        row = jnp.where(hit, idx, row)
    found = found & k_ok
    start = table.offsets[row]
    stop = jnp.where(found, table.offsets[row + 1], start)
    e = jnp.arange(table.max_entries, dtype=jnp.int32)
    ent = start[..., None] + e  # [B, K, max_entries]
    valid = ent < stop[..., None]
    ent = jnp.where(valid, ent, table.next_tokens.shape[0] - 1)
    tok = jnp.where(valid, table.next_tokens[ent], 0).reshape(b, -1)
    pen = jnp.where(valid, table.penalties[ent], 0.0).reshape(b, -1)
    return tok, pen, valid.reshape(b, -1)


def veto_entries(table: VetoTable, context_BxC: jax.Array, context_len_B: jax.Array,
                 min_prefix: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Vetoed next tokens of each row: the union over suffix lengths k = min_prefix..min(C, context_len).

    context_BxC int32 right-aligned, context_len_B int32 real tokens per row (see module docstring).
    Returns ``(token_ids_BxM int32, penalties_BxM float32, valid_BxM bool)`` with
    M = (number of suffix lengths) x max_entries; a token vetoed by several suffixes appears once
    (valid) with the max penalty; valid entries come first in each row, sorted by token id.
    Jittable; ``min_prefix`` is static.
    """
    tok, pen, valid = veto_candidates(table, context_BxC, context_len_B, min_prefix)
    b = tok.shape[0]
    if tok.shape[1] == 0:
        return tok, pen, valid
    # Deduplicate across suffix lengths: sort each row by (token, -penalty); the first of each run of
    # equal tokens carries the max penalty. O(M log M) per row, no [M, M] comparison matrix.
    big = jnp.int32(np.iinfo(np.int32).max)
    key, neg = jax.lax.sort((jnp.where(valid, tok, big), jnp.where(valid, -pen, 0.0)), dimension=1, num_keys=2)
    first = jnp.concatenate([jnp.ones((b, 1), bool), key[:, 1:] != key[:, :-1]], axis=1)
    valid = first & (key != big)
    return jnp.where(valid, key, 0), jnp.where(valid, -neg, 0.0), valid


def unique_slots(tok_BxM: jax.Array, pen_BxM: jax.Array, valid_BxM: jax.Array) -> jax.Array:
    """valid_BxM of ``veto_candidates`` slots keeping one slot per token: its max penalty (first on ties).

    The slots stay where they are (nothing is sorted), so a consumer that sums over entries (the CBD
    loss) sees each vetoed token once, with the same token -> penalty map as ``veto_entries``. A scan
    over the M slots compares slot j with every slot of its row ([B, M] work per step, never a
    [B, M, M] buffer), which is cheaper than the per-row sort.
    """
    e_M = jnp.arange(tok_BxM.shape[1])

    def beat(beaten_BxM, j):  # does slot j (valid, same token) beat each slot of its row?
        tok_j, pen_j, ok_j = (jax.lax.dynamic_slice_in_dim(x, j, 1, axis=1) for x in (tok_BxM, pen_BxM, valid_BxM))
        wins = (pen_j > pen_BxM) | ((pen_j == pen_BxM) & (j < e_M)[None, :])
        return beaten_BxM | ((tok_BxM == tok_j) & ok_j & wins), None

    beaten, _ = jax.lax.scan(beat, jnp.zeros(tok_BxM.shape, bool), e_M)
    return valid_BxM & ~beaten
