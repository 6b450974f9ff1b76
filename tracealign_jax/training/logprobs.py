"""Per-token log-probabilities of the scored tokens only, in sequence chunks, so [B, L, V] logits never exist.

Alignment: ``token_logps_BxL[:, t] = log p(tokens[t] | its prefix)`` (nats), in the token frame. The
logits that score token t come from the final hidden state of its predecessor slot: t-1, or for
shared-prompt pair rows ``[prompt | chosen | rejected]`` (``training.data``) the prompt's last slot
for the first rejected token (``predecessor_slots``). A slot with no predecessor (position 0) gets 0.

Which tokens: ``scored_slots`` picks them. Every slot (``size`` 0), or only the loss-masked (response)
tokens, ``size`` static slots per row: the unembedding then runs on ``size`` positions per row instead
of L, so a pair row of prompt 512 + responses 2 x 128 computes 256 logit vectors, not 768. Unscored
slots read 0 (no loss reads them: every objective masks by ``loss_mask``).

Memory: the loop over chunks of the scored slots is a ``lax.scan`` whose body is rematerialized
(``jax.checkpoint``), so forward and backward hold one ``[B, chunk, V]`` logits block at a time
(float32). With tensor parallelism the vocabulary axis of the unembedding is sharded, so each device
holds ``[B, chunk, V / tensor]``. CBD term (b) needs the policy's log-prob of a few sparse veto tokens
per position; they are gathered from the same logits block (M gathers per position, no extra matmul).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from tracealign_jax import sharding


class ScoredSlots(NamedTuple):
    """Which tokens a log-prob pass scores, and with which hidden state: [B, S] each (``scored_slots``)."""

    token_BxS: jax.Array | None  # int32 slot of each scored token; None: every slot, in order (S = L)
    hidden_BxS: jax.Array  # int32 slot of the hidden state whose logits score it
    used_BxS: jax.Array  # bool; False on filler slots, which read 0 and get no gradient


def scored_slots(tokens_BxL: jax.Array, branch_BxL: jax.Array | None = None, mask_BxL: jax.Array | None = None,
                 size: int = 0) -> ScoredSlots:  # fmt: skip
    """The slots to score: every slot (``size`` <= 0, ``size`` >= L or no mask), or the ``mask_BxL`` > 0
    tokens only, in row order, in ``size`` slots per row. ``size`` must be at least the most masked
    tokens of any row (the callers check it on the host: ``training.data.check_response_lengths``);
    tokens past it would not be scored. ``branch_BxL``: shared-prompt rows (``predecessor_slots``)."""
    b, l = tokens_BxL.shape
    pred_BxL = predecessor_slots(branch_BxL) if branch_BxL is not None else jnp.broadcast_to(
        jnp.arange(l, dtype=jnp.int32) - 1, (b, l))  # fmt: skip
    if mask_BxL is None or size <= 0 or size >= l:
        return ScoredSlots(None, jnp.maximum(pred_BxL, 0), pred_BxL >= 0)
    on_BxL = (mask_BxL > 0) & (pred_BxL >= 0)
    token_BxS = jnp.argsort(jnp.where(on_BxL, 0, 1).astype(jnp.int32), axis=1, stable=True)[:, :size].astype(jnp.int32)
    return ScoredSlots(token_BxS, jnp.maximum(gather_slots(pred_BxL, token_BxS), 0), gather_slots(on_BxL, token_BxS))


def gather_slots(x_BxL: jax.Array, slots_BxS: jax.Array | None) -> jax.Array:
    """``x[b, slots[b, s], ...]``: [B, S, ...] (x itself when ``slots`` is None)."""
    if slots_BxS is None:
        return x_BxL
    return jnp.take_along_axis(x_BxL, slots_BxS.reshape(slots_BxS.shape + (1,) * (x_BxL.ndim - 2)), axis=1)


def scatter_slots(values_BxS: jax.Array, scored: ScoredSlots, length: int) -> jax.Array:
    """Scored values back to their token slots: [B, L, ...], 0 on unscored slots (row by row, so a
    batch-sharded array stays local)."""
    used = scored.used_BxS.reshape(scored.used_BxS.shape + (1,) * (values_BxS.ndim - 2))
    values_BxS = jnp.where(used, values_BxS, 0.0)
    if scored.token_BxS is None:
        return values_BxS
    put = lambda v, s: jnp.zeros((length,) + v.shape[1:], v.dtype).at[s].set(v, unique_indices=True)  # noqa: E731
    return jax.vmap(put)(values_BxS, scored.token_BxS)


def chunk_scan(block: Callable[..., Any], xs: tuple[jax.Array | None, ...], chunk: int) -> Any:
    """``block(*xs)`` over sequence chunks of the [B, S, ...] arrays ``xs`` (None passes through):
    ``chunk`` positions at a time (0: all S at once; S padded up to a multiple) under a rematerialized
    ``lax.scan``; outputs re-assembled to [B, S, ...]."""
    b, s = next(x for x in xs if x is not None).shape[:2]
    c = s if chunk <= 0 or chunk >= s else chunk
    n_chunks = -(-s // c)
    body = jax.checkpoint(block)
    if n_chunks == 1:
        return body(*xs)
    pad = n_chunks * c - s

    def to_chunks(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((b, n_chunks, c) + x.shape[2:]), 1, 0)

    def from_chunks(x: jax.Array) -> jax.Array:
        return jnp.moveaxis(x, 0, 1).reshape((b, n_chunks * c) + x.shape[3:])[:, :s]

    _, out = jax.lax.scan(lambda carry, x: (carry, body(*x)), None, tuple(None if x is None else to_chunks(x) for x in xs))
    return jax.tree.map(from_chunks, out)


def gathered_unembedding(unembed_DxV: jax.Array, compute_dtype: jnp.dtype) -> jax.Array:
    """The output projection [D, V] in ``compute_dtype``, whole on the FSDP axis (vocab as the rules say).

    An FSDP all-gather, done once before a loop over sequence chunks. Left sharded on embed, XLA's TPU
    partitioner re-gathers the head inside every rematerialized chunk (34 GiB per step per chip on
    Llama-3.1-8B TRACE + LoRA with a bf16 head, v5e-8) or rotates the [B, C, V] chunks through rings of
    collective-permutes.
    """
    return sharding.constrain(unembed_DxV.astype(compute_dtype), (None, "vocab"))


def token_logprobs(h_BxLxD: jax.Array, unembed_DxV: jax.Array, tokens_BxL: jax.Array, scored: ScoredSlots, *,
                   chunk: int = 0, entry_ids_BxLxM: jax.Array | None = None,
                   compute_dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array | None]:  # fmt: skip
    """Log-probs of the scored tokens and (optionally) of veto-entry tokens, from final hidden states.

    h_BxLxD: hidden states after the final norm; unembed_DxV: the output projection (tied or not);
    tokens_BxL int32; scored: ``scored_slots``. chunk: scored positions per logits block (0 = all at
    once). entry_ids_BxLxM int32: token ids whose log-prob is wanted at each position, in the token
    frame (entry e at position t is a candidate for token t). The matmul runs in ``compute_dtype``
    with float32 accumulation; log-softmax is float32. Returns ``(token_logps_BxL float32,
    entry_logps_BxLxM float32 | None)``, 0 where not scored.
    """
    with jax.named_scope("logprobs"):
        return _token_logprobs(h_BxLxD, unembed_DxV, tokens_BxL, scored, chunk, entry_ids_BxLxM, compute_dtype)


def _token_logprobs(h_BxLxD: jax.Array, unembed_DxV: jax.Array, tokens_BxL: jax.Array, scored: ScoredSlots, chunk: int,
                    entry_ids_BxLxM: jax.Array | None, compute_dtype: jnp.dtype) -> tuple[jax.Array, jax.Array | None]:  # fmt: skip
    w = gathered_unembedding(unembed_DxV, compute_dtype)

    def block(h_BxCxD: jax.Array, tgt_BxC: jax.Array, ent_BxCxM: jax.Array | None):
        logits = jnp.einsum("bcd,dv->bcv", h_BxCxD.astype(compute_dtype), w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tgt_BxC[..., None], axis=-1)[..., 0] - lse
        if ent_BxCxM is None:
            return tgt, None
        return tgt, jnp.take_along_axis(logits, ent_BxCxM, axis=-1) - lse[..., None]

    ents = None if entry_ids_BxLxM is None else gather_slots(entry_ids_BxLxM, scored.token_BxS)
    tgt, ent = chunk_scan(block, (gather_slots(h_BxLxD, scored.hidden_BxS), gather_slots(tokens_BxL, scored.token_BxS),
                                  ents), chunk)  # fmt: skip
    length = tokens_BxL.shape[1]
    return scatter_slots(tgt, scored, length), None if ent is None else scatter_slots(ent, scored, length)


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
