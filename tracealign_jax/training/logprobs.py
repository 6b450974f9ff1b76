"""Per-token log-probabilities in sequence chunks, so the [B, L, V] logits never exist at once.

Alignment: ``token_logps_BxL[:, t] = log p(tokens[t] | tokens[:t])`` (nats); position 0 has no
prefix and gets 0 (it is never a response token). The logits that score token t come from the final
hidden state at t-1; all arrays here are returned in the token frame (already shifted).

Memory: the loop over sequence chunks is a ``lax.scan`` whose body is rematerialized
(``jax.checkpoint``), so forward and backward hold one ``[B, chunk, V]`` logits block at a time
(float32) instead of ``[B, L, V]``. With tensor parallelism the vocabulary axis of the unembedding
is sharded, so each device holds ``[B, chunk, V / tensor]``: vocabulary chunking comes from the mesh.
CBD term (b) needs the policy's log-prob of a few sparse veto tokens per position; they are gathered
from the same logits block, which costs M extra gathers per position and no extra matmul.

Shared-prompt pair rows ``[prompt | chosen | rejected]`` (``training.data``): every token is scored by
the slot before it except the first rejected one, scored by the prompt's last hidden state. Callers
pass ``rescore`` = (that hidden slot, that token slot) per row (``rejected_start``); the one extra
[B, D] x [D, V] product replaces the shifted value there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tracealign_jax import sharding


def _shift_to_token_frame(x_BxL: jax.Array) -> jax.Array:
    """Values computed at hidden position s (about token s+1) moved to position s+1; position 0 = 0."""
    pad = [(0, 0)] * x_BxL.ndim
    pad[1] = (1, 0)
    return jnp.pad(x_BxL[:, :-1], pad)


def gathered_unembedding(unembed_DxV: jax.Array, compute_dtype: jnp.dtype) -> jax.Array:
    """The output projection [D, V] in ``compute_dtype``, whole on the FSDP axis (vocab as the rules say).

    An FSDP all-gather, done once before a loop over sequence chunks. Left sharded on embed, XLA's TPU
    partitioner re-gathers the head inside every rematerialized chunk (34 GiB per step per chip on
    Llama-3.1-8B TRACE + LoRA with a bf16 head, v5e-8) or rotates the [B, C, V] chunks through rings of
    collective-permutes.
    """
    return sharding.constrain(unembed_DxV.astype(compute_dtype), (None, "vocab"))


def chunked_token_logprobs(
    h_BxLxD: jax.Array,
    unembed_DxV: jax.Array,
    tokens_BxL: jax.Array,
    *,
    chunk: int = 0,
    entry_ids_BxLxM: jax.Array | None = None,
    compute_dtype: jnp.dtype = jnp.float32,
    rescore: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Log-probs of each token and (optionally) of veto-entry tokens, from final hidden states.

    h_BxLxD: hidden states after the final norm; unembed_DxV: the output projection (tied or not);
    tokens_BxL int32. chunk: sequence positions per logits block (0 = all L at once; L is padded up
    to a multiple). entry_ids_BxLxM int32: token ids whose log-prob is wanted at each position, in
    the token frame (entry e at position t is a candidate for token t). The matmul runs in
    ``compute_dtype`` with float32 accumulation; log-softmax is float32. rescore: (hidden slot int32[B],
    token slot int32[B]): that token of each row is scored by that hidden state instead of the one before.
    Returns ``(token_logps_BxL float32, entry_logps_BxLxM float32 | None)``.
    """
    b, l, d = h_BxLxD.shape
    next_BxL = jnp.pad(tokens_BxL[:, 1:], ((0, 0), (0, 1)))  # target of hidden s is token s+1
    entries = None
    if entry_ids_BxLxM is not None:
        # Entries for token t are scored by hidden t-1: move them to the hidden frame.
        entries = jnp.pad(entry_ids_BxLxM[:, 1:], ((0, 0), (0, 1), (0, 0)))
    c = l if chunk <= 0 or chunk >= l else chunk
    n_chunks = -(-l // c)
    pad = n_chunks * c - l
    w = gathered_unembedding(unembed_DxV, compute_dtype)

    def to_chunks(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n_chunks, c) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    @jax.checkpoint
    def block(h_BxCxD: jax.Array, tgt_BxC: jax.Array, ent_BxCxM: jax.Array | None):
        logits = jnp.einsum("bcd,dv->bcv", h_BxCxD.astype(compute_dtype), w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tgt_BxC[..., None], axis=-1)[..., 0] - lse
        if ent_BxCxM is None:
            return tgt, None
        ent = jnp.take_along_axis(logits, ent_BxCxM, axis=-1) - lse[..., None]
        return tgt, ent

    xs = (to_chunks(h_BxLxD), to_chunks(next_BxL), None if entries is None else to_chunks(entries))
    if n_chunks == 1:
        tgt, ent = block(xs[0][0], xs[1][0], None if entries is None else xs[2][0])
        tgt, ent = tgt[None], None if ent is None else ent[None]
    else:
        _, (tgt, ent) = jax.lax.scan(lambda carry, x: (carry, block(*x)), None, xs)

    def from_chunks(x: jax.Array) -> jax.Array:
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape((b, n_chunks * c) + x.shape[3:])[:, :l]

    token_logps = _shift_to_token_frame(from_chunks(tgt))
    entry_logps = None if ent is None else _shift_to_token_frame(from_chunks(ent))
    if rescore is not None:
        src_B, dst_B = rescore
        at = lambda x, i: jnp.take_along_axis(x, i.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
        one_tgt, one_ent = block(at(h_BxLxD, src_B), at(tokens_BxL, dst_B),
                                 None if entry_ids_BxLxM is None else at(entry_ids_BxLxM, dst_B))  # fmt: skip
        here = (jnp.arange(l)[None] == dst_B[:, None])
        token_logps = jnp.where(here, one_tgt, token_logps)
        if entry_logps is not None:
            entry_logps = jnp.where(here[..., None], one_ent, entry_logps)
    return token_logps, entry_logps


def response_token_logprobs(h_BxLxD: jax.Array, unembed_DxV: jax.Array, tokens_BxL: jax.Array, mask_BxL: jax.Array,
                            pred_BxL: jax.Array, size: int, compute_dtype: jnp.dtype = jnp.float32
                            ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """Log-probs of the masked (response) tokens only: the unembedding runs on ``size`` slots per row
    instead of all L, so prompt positions, whose logits no loss reads, cost nothing.

    mask_BxL: tokens to score (> 0); pred_BxL int32: the hidden slot scoring each token (``slot - 1``, or
    ``predecessor_slots`` for shared-prompt rows); size: slots kept per row, at least the most masked
    tokens of any row (the caller checks: tokens past ``size`` would be dropped). Returns
    ``(logps_BxS float32 nats, 0 on unused slots; slot_BxS int32: the token slot of each)``, masked
    tokens first, in row order.
    """
    on_BxL = mask_BxL > 0
    slot_BxS = jnp.argsort(jnp.where(on_BxL, 0, 1).astype(jnp.int32), axis=1, stable=True)[:, :size].astype(jnp.int32)
    used_BxS = jnp.take_along_axis(on_BxL, slot_BxS, axis=1)
    src_BxS = jnp.maximum(jnp.take_along_axis(pred_BxL, slot_BxS, axis=1), 0)
    h_BxSxD = jnp.take_along_axis(h_BxLxD, src_BxS[..., None], axis=1)
    w = gathered_unembedding(unembed_DxV, compute_dtype)
    logits = jnp.einsum("bsd,dv->bsv", h_BxSxD.astype(compute_dtype), w, preferred_element_type=jnp.float32)
    tgt = jnp.take_along_axis(logits, jnp.take_along_axis(tokens_BxL, slot_BxS, axis=1)[..., None], axis=-1)[..., 0]
    return jnp.where(used_BxS, tgt - jax.nn.logsumexp(logits, axis=-1), 0.0), slot_BxS


def veto_contexts(tokens_BxL: jax.Array, context_len: int, prev_BxL: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """For every position t, the ``context_len`` tokens before it, right-aligned: ``[B, L, C]`` int32.

    ``context_BxLxC[b, t, C-1]`` is token t-1 (the most recent), ``[..., C-k]`` token t-k; slots before
    the row start hold 0 and ``length_BxL = min(t, C)`` says how many are real. This is the prefix
    whose veto entries are the candidates for token t. With ``prev_BxL`` (``predecessor_slots``) the
    prefix follows the predecessor chain instead of the slots (shared-prompt rows: a rejected token's
    prefix is its rejected prefix and then the prompt, never the chosen response).
    """
    if prev_BxL is not None:
        cols, lengths, cur = [], jnp.zeros_like(prev_BxL), prev_BxL
        for _ in range(context_len):  # C small gathers walking back along the chain
            real = cur >= 0
            at = jnp.maximum(cur, 0)
            cols.append(jnp.where(real, jnp.take_along_axis(tokens_BxL, at, axis=1), 0))
            lengths = lengths + real.astype(jnp.int32)
            cur = jnp.where(real, jnp.take_along_axis(prev_BxL, at, axis=1), -1)
        return jnp.stack(cols[::-1], axis=-1).astype(jnp.int32), lengths
    b, l = tokens_BxL.shape
    offsets_C = jnp.arange(context_len, dtype=jnp.int32) - context_len  # -C .. -1
    pos_LxC = jnp.arange(l, dtype=jnp.int32)[:, None] + offsets_C[None, :]
    ok_LxC = pos_LxC >= 0
    ctx = jnp.take(tokens_BxL, jnp.clip(pos_LxC, 0, l - 1), axis=1)  # [B, L, C]
    ctx = jnp.where(ok_LxC[None], ctx, 0).astype(jnp.int32)
    length_L = jnp.minimum(jnp.arange(l, dtype=jnp.int32), context_len)
    return ctx, jnp.broadcast_to(length_L[None], (b, l))


def predecessor_slots(branch_BxL: jax.Array) -> jax.Array:
    """int32[B, L]: slot of the hidden state that scores each token of shared-prompt pair rows.

    branch_BxL int32: 0 prompt, 1 chosen, 2 rejected, -1 padding (``training.data``). Every token is
    scored by the slot before it, except the first rejected token, scored by the prompt's last token
    (slot = prompt length - 1); slot 0 has none (-1).
    """
    slots_L = jnp.arange(branch_BxL.shape[1], dtype=jnp.int32)
    src_B, dst_B = rejected_start(branch_BxL)
    return jnp.where(slots_L[None] == dst_B[:, None], src_B[:, None], slots_L[None] - 1)


def rejected_start(branch_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(prompt's last slot, first rejected slot), each int32[B], of shared-prompt pair rows
    (``branch_BxL``: 0 prompt, 1 chosen, 2 rejected, -1 padding)."""
    prompt_B = jnp.sum(branch_BxL == 0, axis=-1, dtype=jnp.int32)
    chosen_B = jnp.sum(branch_BxL == 1, axis=-1, dtype=jnp.int32)
    return prompt_B - 1, prompt_B + chosen_B
