"""Greedy decoding and temperature / top-k / top-p sampling: one ``lax.while_loop``, one row per prompt.

They share beam search's step (``step.next_logprobs``: model call, log-softmax, provenance hook on
the running context); only the choice of the next token differs. A row stops at EOS, at
max_new_tokens, or, when the hook forbids every candidate, with the configured refusal tokens.
The returned score is the summed (veto-adjusted) log-prob of the chosen tokens under the
unfiltered, temperature-1 distribution.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from tracealign_jax.decoding.step import (
    NEG_INF,
    DecodeOutput,
    LogitsHook,
    TokensToLogits,
    next_logprobs,
    push_context,
    write_tokens,
)


@flax.struct.dataclass
class SampleState:
    """Loop carry for B rows with T token slots and C context tokens."""

    step: jax.Array  # int32 scalar
    tokens_BxT: jax.Array  # int32 generated tokens, pad after length
    last_B: jax.Array  # int32 token the model consumes next
    context_BxC: jax.Array  # int32 running context, right-aligned
    context_len_B: jax.Array  # int32
    logprob_B: jax.Array  # float32 summed log-prob of the chosen tokens
    length_B: jax.Array  # int32 generated tokens incl. EOS / refusal
    done_B: jax.Array  # bool
    refused_B: jax.Array  # bool
    vetoes_B: jax.Array  # int32 vetoed expansions along this row's prefixes
    rng: jax.Array  # PRNG key
    model_state: Any  # pytree, batch axis 0 of size B


def filter_logprobs(logprobs_BxV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Sampling logits: log-probs / temperature, keeping the top_k tokens (0 = all) and the smallest
    set whose probability reaches top_p (1.0 = all); dropped tokens get NEG_INF. The most likely
    token always survives."""
    logits_BxV = logprobs_BxV / temperature
    if top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_B1, NEG_INF, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        # Keep a sorted token while the mass strictly before it is below top_p; cutoff = smallest kept logit.
        kept_BxV = mass_before_BxV < top_p
        cutoff_B1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_B1, NEG_INF, logits_BxV)
    return logits_BxV


def sample(
    tokens_to_logits: TokensToLogits,
    model_state: Any,
    last_tokens_B: jax.Array,
    context_BxC: jax.Array,
    context_len_B: jax.Array,
    *,
    max_new_tokens: int,
    eos_id: int,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    logits_hook: LogitsHook | None = None,
    refusal: Sequence[int] = (),
    pad_id: int = 0,
) -> DecodeOutput:
    """Samples one continuation per prompt (greedy when ``temperature == 0`` or ``rng`` is None).

    Arguments as in ``beam_search.beam_search``; returns a DecodeOutput with K = 1.
    """
    b = last_tokens_B.shape[0]
    greedy_mode = rng is None or temperature == 0.0
    refusal_R = jnp.asarray(list(refusal) + ([eos_id] if not refusal or refusal[-1] != eos_id else []), jnp.int32)
    r = int(refusal_R.shape[0])
    t = max_new_tokens + r - 1
    init = SampleState(
        step=jnp.zeros((), jnp.int32),
        tokens_BxT=jnp.full((b, t), pad_id, jnp.int32),
        last_B=last_tokens_B.astype(jnp.int32),
        context_BxC=context_BxC.astype(jnp.int32),
        context_len_B=context_len_B.astype(jnp.int32),
        logprob_B=jnp.zeros((b,), jnp.float32),
        length_B=jnp.zeros((b,), jnp.int32),
        done_B=jnp.zeros((b,), bool),
        refused_B=jnp.zeros((b,), bool),
        vetoes_B=jnp.zeros((b,), jnp.int32),
        rng=jax.random.key(0) if rng is None else rng,
        model_state=model_state,
    )

    def cond(s: SampleState) -> jax.Array:
        return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

    def body(s: SampleState) -> SampleState:
        logprobs_BxV, step_vetoes_B, model_state = next_logprobs(
            tokens_to_logits, logits_hook, s.last_B, s.model_state, s.context_BxC, s.context_len_B
        )
        rng, key = jax.random.split(s.rng)
        if greedy_mode:
            token_B = jnp.argmax(logprobs_BxV, axis=-1).astype(jnp.int32)
        else:
            logits_BxV = filter_logprobs(logprobs_BxV, temperature, top_k, top_p)
            token_B = jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)
        token_lp_B = jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
        live_B = ~s.done_B
        refuse_B = live_B & (jnp.max(logprobs_BxV, axis=-1) <= NEG_INF / 2)
        emit_B = live_B & ~refuse_B
        step_B = jnp.full((b,), s.step, jnp.int32)
        tokens_BxT = jnp.where(
            (jnp.arange(t) == s.step)[None, :] & emit_B[:, None], token_B[:, None], s.tokens_BxT
        )
        tokens_BxT = jnp.where(
            refuse_B[:, None], write_tokens(tokens_BxT, step_B, jnp.broadcast_to(refusal_R, (b, r))), tokens_BxT
        )
        ends_B = emit_B & (token_B == eos_id)
        context_BxC, context_len_B = push_context(s.context_BxC, s.context_len_B, token_B)
        return SampleState(
            step=s.step + 1,
            tokens_BxT=tokens_BxT,
            last_B=jnp.where(emit_B, token_B, s.last_B),
            context_BxC=jnp.where(emit_B[:, None], context_BxC, s.context_BxC),
            context_len_B=jnp.where(emit_B, context_len_B, s.context_len_B),
            logprob_B=s.logprob_B + jnp.where(emit_B, token_lp_B, 0.0),
            length_B=jnp.where(emit_B, s.step + 1, jnp.where(refuse_B, s.step + r, s.length_B)),
            done_B=s.done_B | ends_B | refuse_B,
            refused_B=s.refused_B | refuse_B,
            vetoes_B=s.vetoes_B + jnp.where(live_B, step_vetoes_B, 0),
            rng=rng,
            model_state=model_state,
        )

    s = jax.lax.while_loop(cond, body, init)
    return DecodeOutput(
        tokens_BxKxT=s.tokens_BxT[:, None],
        lengths_BxK=s.length_B[:, None],
        scores_BxK=s.logprob_B[:, None],
        logprobs_BxK=s.logprob_B[:, None],
        valid_BxK=jnp.ones((b, 1), bool),
        refused_BxK=s.refused_B[:, None],
        vetoes_BxK=s.vetoes_B[:, None],
        steps=s.step,
    )


def greedy(
    tokens_to_logits: TokensToLogits,
    model_state: Any,
    last_tokens_B: jax.Array,
    context_BxC: jax.Array,
    context_len_B: jax.Array,
    **kwargs: Any,
) -> DecodeOutput:
    """Greedy decoding: ``sample`` taking the argmax of the (veto-adjusted) log-probs at every step."""
    kwargs = {key: val for key, val in kwargs.items() if key not in ("rng", "temperature", "top_k", "top_p")}
    return sample(tokens_to_logits, model_state, last_tokens_B, context_BxC, context_len_B, rng=None, **kwargs)
