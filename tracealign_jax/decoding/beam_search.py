"""Beam search as one ``lax.while_loop`` (t5x style): live and finished sets, top-2K candidates.

Per step, for B rows x K live beams: score all K x V one-token extensions (beam log-prob + step
log-prob, through the provenance hook on each beam's running sequence), keep the best 2K (so K of
them are not EOS); the live set takes the best K non-EOS candidates (the KV cache follows its parent
beam), the finished set the best K of (old finished, new EOS candidates, the refusal candidate) by
score = log-prob / brevity_penalty, ((5 + length) / 6) ** alpha.

Early termination per row: log-probs only decrease and length is at most L_max, so no live beam can
score above ``best_live_logprob / max(bp(step+1), bp(L_max))``; a row is done when its worst finished
score beats that (the comparison transformers#20901 had inverted) or no live beam is left.
A row whose every candidate the hook forbids (hard veto) ends its best live beam with the refusal
tokens (``refused`` True). At the end, unfinished live beams compete for the K slots the same way.

A refusal is a fallback, not a hypothesis: its tokens are not the model's text and their cost is
unknown (scoring them 0 let a short prefix + refusal outrank every allowed output), so it ranks below
every allowed hypothesis (finished, or cut at max_new_tokens) and is returned first only when the row
has no allowed hypothesis at all.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from tracealign_jax import sharding
from tracealign_jax.decoding.step import (
    NEG_INF,
    DecodeOutput,
    LogitsHook,
    TokensToLogits,
    brevity_penalty,
    next_logprobs,
    push_context,
    repeat_rows,
    take_beams,
    write_tokens,
)


@flax.struct.dataclass
class BeamState:
    """Loop carry. B rows, K beams, T token slots, C context tokens; both sets sorted best first."""

    step: jax.Array  # int32 scalar: tokens generated so far by every live beam
    live_logprobs_BxK: jax.Array  # float32 summed log-probs; <= NEG_INF/2 means no beam
    live_tokens_BxKxT: jax.Array  # int32 generated tokens, pad after `step`
    live_last_BxK: jax.Array  # int32 token the model consumes next (last prompt token at step 0)
    live_context_BxKxC: jax.Array  # int32 running context (prompt + generated), right-aligned
    live_context_len_BxK: jax.Array  # int32 real tokens in the running context (<= C)
    live_vetoes_BxK: jax.Array  # int32 vetoed expansions along this beam's prefixes
    finished_scores_BxK: jax.Array  # float32 log-prob / bp(length); NEG_INF for an empty slot
    finished_logprobs_BxK: jax.Array  # float32
    finished_tokens_BxKxT: jax.Array  # int32
    finished_lengths_BxK: jax.Array  # int32 generated tokens incl. EOS / refusal
    finished_vetoes_BxK: jax.Array  # int32
    finished_refused_BxK: jax.Array  # bool
    refusal_tokens_BxT: jax.Array  # int32 the row's refusal (best live prefix + refusal tokens), if any
    refusal_logprob_B: jax.Array  # float32 log-prob of that prefix; NEG_INF when the row never refused
    refusal_length_B: jax.Array  # int32 generated tokens incl. the refusal tokens
    refusal_vetoes_B: jax.Array  # int32
    model_state: Any  # pytree, batch axis 0 of size B*K (beam k of row b at b*K + k)


def _gather(x_BxNx: jax.Array, index_BxM: jax.Array) -> jax.Array:
    """x[b, index[b, m], ...] -> [B, M, ...]."""
    index = index_BxM.reshape(index_BxM.shape + (1,) * (x_BxNx.ndim - 2))
    return jnp.take_along_axis(x_BxNx, index, axis=1)


def beam_search(
    tokens_to_logits: TokensToLogits,
    model_state: Any,
    last_tokens_B: jax.Array,
    context_BxC: jax.Array,
    context_len_B: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int,
    alpha: float,
    logits_hook: LogitsHook | None = None,
    refusal: Sequence[int] = (),
    pad_id: int = 0,
    early_stop: bool = True,
) -> DecodeOutput:
    """Beam search for B prompts; returns the K best sequences per row (DecodeOutput, K = num_beams).

    model_state: pytree for B rows (batch axis 0, e.g. the KV cache after prefilling all prompt
      tokens but the last); it is repeated to B*K beams here. last_tokens_B: int32 the last prompt
      token of each row (the first token the loop feeds). context_BxC / context_len_B: the running
      context of each prompt for the hook (``step.prompt_context``). refusal: tokens that end a row
      whose every candidate is vetoed; EOS is appended if absent. alpha: length-penalty exponent.
      early_stop: stop once no row can change (False runs all max_new_tokens steps; same result).
    Each returned sequence has <= max_new_tokens generated tokens (+ refusal tokens beyond the first).
    """
    b = last_tokens_B.shape[0]
    k = num_beams
    refusal_R = jnp.asarray(list(refusal) + ([eos_id] if not refusal or refusal[-1] != eos_id else []), jnp.int32)
    r = int(refusal_R.shape[0])
    t = max_new_tokens + r - 1
    c = context_BxC.shape[-1]
    # Longest sequence a live beam can still become: max_new_tokens, or a refusal started at the last step.
    max_len = max_new_tokens + (r - 1 if logits_hook is not None else 0)

    def per_beam(x_B: jax.Array) -> jax.Array:
        return jnp.repeat(x_B[:, None], k, axis=1)

    init = BeamState(
        step=jnp.zeros((), jnp.int32),
        live_logprobs_BxK=jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1)),
        live_tokens_BxKxT=jnp.full((b, k, t), pad_id, jnp.int32),
        live_last_BxK=per_beam(last_tokens_B.astype(jnp.int32)),
        live_context_BxKxC=per_beam(context_BxC.astype(jnp.int32)),
        live_context_len_BxK=per_beam(context_len_B.astype(jnp.int32)),
        live_vetoes_BxK=jnp.zeros((b, k), jnp.int32),
        finished_scores_BxK=jnp.full((b, k), NEG_INF, jnp.float32),
        finished_logprobs_BxK=jnp.full((b, k), NEG_INF, jnp.float32),
        finished_tokens_BxKxT=jnp.full((b, k, t), pad_id, jnp.int32),
        finished_lengths_BxK=jnp.zeros((b, k), jnp.int32),
        finished_vetoes_BxK=jnp.zeros((b, k), jnp.int32),
        finished_refused_BxK=jnp.zeros((b, k), bool),
        refusal_tokens_BxT=jnp.full((b, t), pad_id, jnp.int32),
        refusal_logprob_B=jnp.full((b,), NEG_INF, jnp.float32),
        refusal_length_B=jnp.zeros((b,), jnp.int32),
        refusal_vetoes_B=jnp.zeros((b,), jnp.int32),
        model_state=repeat_rows(model_state, k),
    )

    def row_done_B(s: BeamState) -> jax.Array:
        best_live_B = s.live_logprobs_BxK[:, 0]
        bound_B = best_live_B / jnp.maximum(brevity_penalty(alpha, s.step + 1), brevity_penalty(alpha, max_len))
        no_live_B = best_live_B <= NEG_INF / 2
        return no_live_B | (s.finished_scores_BxK[:, -1] > bound_B)

    def cond(s: BeamState) -> jax.Array:
        if not early_stop:
            return s.step < max_new_tokens
        return (s.step < max_new_tokens) & ~jnp.all(row_done_B(s))

    def body(s: BeamState) -> BeamState:
        flat = lambda x: x.reshape((b * k,) + x.shape[2:])  # noqa: E731
        logprobs_BKxV, _, model_state = next_logprobs(
            tokens_to_logits, None, flat(s.live_last_BxK), s.model_state, None, None
        )
        v = logprobs_BKxV.shape[-1]
        # The hook acts on the candidate scores (beam log-prob + step log-prob) rather than on the
        # step log-probs: a soft penalty is additive either way and a forbidden candidate is invalid
        # either way, but log-softmax and the sum then stay one fused pass over [B*K, V], and the
        # hook's sparse scatter updates the array top_k reads in place.
        cand_BKxV = logprobs_BKxV + flat(s.live_logprobs_BxK)[:, None]
        if logits_hook is None:
            step_vetoes_BK = jnp.zeros((b * k,), jnp.int32)
        else:
            cand_BKxV, step_vetoes_BK = logits_hook(
                cand_BKxV, flat(s.live_context_BxKxC), flat(s.live_context_len_BxK)
            )
        step_vetoes_BxK = step_vetoes_BK.reshape(b, k)
        # Rows stay on their shard through the reshape (else XLA gathers the candidates for top_k).
        cand_BxKV = sharding.constrain(cand_BKxV.reshape(b, k * v), ("batch", None))
        top_lp_Bx2K, top_index_Bx2K = jax.lax.top_k(cand_BxKV, 2 * k)
        parent_Bx2K = top_index_Bx2K // v
        token_Bx2K = (top_index_Bx2K % v).astype(jnp.int32)
        valid_Bx2K = top_lp_Bx2K > NEG_INF / 2
        eos_Bx2K = token_Bx2K == eos_id
        col_T = jnp.arange(t, dtype=jnp.int32)
        tokens_Bx2KxT = jnp.where(col_T == s.step, token_Bx2K[..., None], _gather(s.live_tokens_BxKxT, parent_Bx2K))
        vetoes_Bx2K = _gather(s.live_vetoes_BxK + step_vetoes_BxK, parent_Bx2K)

        # Refusal candidate: the best live beam of a row whose every candidate was vetoed.
        had_live_B = s.live_logprobs_BxK[:, 0] > NEG_INF / 2
        refuse_B = had_live_B & ~valid_Bx2K[:, 0]
        refusal_len = s.step + r
        refusal_tokens_BxT = write_tokens(
            s.live_tokens_BxKxT[:, 0], jnp.full((b,), s.step, jnp.int32), jnp.broadcast_to(refusal_R, (b, r))
        )
        # A row refuses at most once (it has no live beam afterwards); the refusal waits outside the
        # finished set and enters only in _final, below every allowed hypothesis.
        keep_B = lambda new, old: jnp.where(refuse_B.reshape((b,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
        refusal_tokens_BxT = keep_B(refusal_tokens_BxT, s.refusal_tokens_BxT)
        refusal_logprob_B = keep_B(s.live_logprobs_BxK[:, 0], s.refusal_logprob_B)
        refusal_length_B = keep_B(jnp.full((b,), refusal_len, jnp.int32), s.refusal_length_B)
        refusal_vetoes_B = keep_B(s.live_vetoes_BxK[:, 0] + step_vetoes_BxK[:, 0], s.refusal_vetoes_B)

        # Finished set: best K of old finished + EOS candidates.
        new_fin_Bx2K = eos_Bx2K & valid_Bx2K
        new_score_Bx2K = jnp.where(new_fin_Bx2K, top_lp_Bx2K / brevity_penalty(alpha, s.step + 1), NEG_INF)
        all_scores = jnp.concatenate([s.finished_scores_BxK, new_score_Bx2K], axis=1)
        all_lp = jnp.concatenate([s.finished_logprobs_BxK, top_lp_Bx2K], axis=1)
        all_tokens = jnp.concatenate([s.finished_tokens_BxKxT, tokens_Bx2KxT], axis=1)
        all_len = jnp.concatenate([s.finished_lengths_BxK, jnp.full((b, 2 * k), s.step + 1)], axis=1)
        all_vetoes = jnp.concatenate([s.finished_vetoes_BxK, vetoes_Bx2K], axis=1)
        all_refused = jnp.concatenate([s.finished_refused_BxK, jnp.zeros((b, 2 * k), bool)], axis=1)
        fin_scores_BxK, fin_index_BxK = jax.lax.top_k(all_scores, k)

        # Live set: best K non-EOS candidates; a vetoed row has only invalid candidates left.
        live_lp_Bx2K = jnp.where(eos_Bx2K, 2 * NEG_INF, top_lp_Bx2K)
        live_lp_BxK, live_index_BxK = jax.lax.top_k(live_lp_Bx2K, k)
        parent_BxK = _gather(parent_Bx2K, live_index_BxK)
        new_token_BxK = _gather(token_Bx2K, live_index_BxK)
        context_BxKxC, context_len_BxK = push_context(
            _gather(s.live_context_BxKxC, parent_BxK), _gather(s.live_context_len_BxK, parent_BxK), new_token_BxK
        )
        return BeamState(
            step=s.step + 1,
            live_logprobs_BxK=jnp.where(refuse_B[:, None], 2 * NEG_INF, live_lp_BxK),
            live_tokens_BxKxT=_gather(tokens_Bx2KxT, live_index_BxK),
            live_last_BxK=new_token_BxK,
            live_context_BxKxC=context_BxKxC.reshape(b, k, c),
            live_context_len_BxK=context_len_BxK,
            live_vetoes_BxK=_gather(vetoes_Bx2K, live_index_BxK),
            finished_scores_BxK=fin_scores_BxK,
            finished_logprobs_BxK=_gather(all_lp, fin_index_BxK),
            finished_tokens_BxKxT=_gather(all_tokens, fin_index_BxK),
            finished_lengths_BxK=_gather(all_len, fin_index_BxK),
            finished_vetoes_BxK=_gather(all_vetoes, fin_index_BxK),
            finished_refused_BxK=_gather(all_refused, fin_index_BxK),
            refusal_tokens_BxT=refusal_tokens_BxT,
            refusal_logprob_B=refusal_logprob_B,
            refusal_length_B=refusal_length_B,
            refusal_vetoes_B=refusal_vetoes_B,
            model_state=take_beams(model_state, parent_BxK),
        )

    s = jax.lax.while_loop(cond, body, init)
    return _final(s, alpha)


def _final(s: BeamState, alpha: float) -> DecodeOutput:
    """Top K of finished and still-live beams (a live beam is a sequence cut at max_new_tokens), then the
    row's refusal, if any, in the first free slot (below every allowed hypothesis: module docstring)."""
    k = s.live_logprobs_BxK.shape[1]
    live_ok_BxK = s.live_logprobs_BxK > NEG_INF / 2
    live_scores_BxK = jnp.where(live_ok_BxK, s.live_logprobs_BxK / brevity_penalty(alpha, s.step), NEG_INF)
    refused_B = s.refusal_logprob_B > NEG_INF / 2
    refusal_score_B = jnp.where(refused_B, s.refusal_logprob_B / brevity_penalty(alpha, s.refusal_length_B), NEG_INF)
    scores = jnp.concatenate([s.finished_scores_BxK, live_scores_BxK, refusal_score_B[:, None]], axis=1)
    # Rank key: an allowed hypothesis keeps its score (> NEG_INF / 4 for any real log-prob); the refusal
    # sits at NEG_INF / 4, below all of them and above empty slots (NEG_INF).
    keys = scores.at[:, -1].set(jnp.where(refused_B, NEG_INF / 4, NEG_INF))
    _, index_BxK = jax.lax.top_k(keys, k)
    top_BxK = _gather(scores, index_BxK)
    one = lambda x_B: x_B[:, None]  # noqa: E731
    pick = lambda fin, live, ref: _gather(jnp.concatenate([fin, live, ref], axis=1), index_BxK)  # noqa: E731
    lengths = pick(s.finished_lengths_BxK, jnp.broadcast_to(s.step, live_ok_BxK.shape).astype(jnp.int32),
                   one(s.refusal_length_B))
    return DecodeOutput(
        tokens_BxKxT=pick(s.finished_tokens_BxKxT, s.live_tokens_BxKxT, s.refusal_tokens_BxT[:, None]),
        lengths_BxK=lengths,
        scores_BxK=top_BxK,
        logprobs_BxK=pick(s.finished_logprobs_BxK, s.live_logprobs_BxK, one(s.refusal_logprob_B)),
        valid_BxK=_gather(keys, index_BxK) > NEG_INF / 2,
        refused_BxK=pick(s.finished_refused_BxK, jnp.zeros_like(live_ok_BxK), one(refused_B)),
        vetoes_BxK=pick(s.finished_vetoes_BxK, s.live_vetoes_BxK, one(s.refusal_vetoes_B)),
        steps=s.step,
    )
