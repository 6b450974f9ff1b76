"""The TRACE objective as pure functions of log-probabilities (nats), masks and per-pair weights.

Pair categories (``realign.triage``): RETAIN = 0, INVERT = 1, SUPPRESS = 2, one int32 per pair.
Conventions as in ``training.losses``: ``logratio(y) = log pi(y|x) - log pi_ref(y|x)`` summed over
response tokens; rows 2i / 2i+1 of a ``2B`` batch are pair i's y_w / y_l (as the data stored them,
NOT flipped: the objective flips inverted pairs itself).

Terms (paper notation; w_i the impact weights, beta 0.3, alpha_KL 0.1 by default):
  invert    logistic: -log s(beta * (logratio(y_l) - logratio(y_w)))      (the paper's "IPO")
            ipo:      (logratio(y_l) - logratio(y_w) - 1/(2 beta))^2       (Azar et al.'s IPO on the
                      sequence log-ratio margin; ``training.losses`` "ipo" is TRL's per-token average)
  suppress  dual NPO: -log s(-beta logratio(y_w)) - log s(-beta logratio(y_l))
  retain    token-level KL(pi_ref || pi_theta) = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)) at every
            response token of both responses, full vocabulary.
  anchor    (``rpo_alpha`` > 0; not in the paper) RPO's NLL (Pang et al. 2024, ``loss.rpo_alpha`` of DPO)
            on the inversion: -log pi(y_l|x) of each inverted pair, w_i-weighted, a mean over those
            y_l tokens. The logistic term alone can lower both responses instead of raising the
            newly preferred one; the anchor makes TRACE's inversion the same family as a DPO + RPO
            baseline trained on the re-annotated pairs.

Normalisation. The paper sums w_i * term_i over all conflicts with sum_i w_i = 1. A mini-batch holds
a subset, so the weights here are the impact module's ``w_i * N_conflicts`` (mean 1 over conflicts)
and the conflict terms are divided by ``num_conflicts``: over the full conflict set this is exactly
the paper's sum; over a batch it is an unbiased estimate of it. The KL term is a token mean over
retained response tokens (``num_retained_tokens``), the anchor a mean over inverted y_l tokens
(``num_inverted_tokens``). Counts default to those of the arrays at hand; the train step passes the
global batch's, so micro-batch losses add up to the big-batch loss.
Total: L = L_invert + L_suppress + alpha_KL * L_KL (+ rpo_alpha * L_anchor).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS
from tracealign_jax.training.logprobs import ScoredSlots, chunk_scan, gather_slots, gathered_unembedding, scatter_slots

Metrics = dict[str, jax.Array]
InvertLoss = Literal["logistic", "ipo"]


def _count(x: jax.Array, given: Any) -> jax.Array:
    if given is not None:
        return jnp.asarray(given, jnp.float32)
    return jnp.maximum(jnp.sum(x.astype(jnp.float32)), 1.0)


def invert_losses(chosen_ratio_B: jax.Array, rejected_ratio_B: jax.Array, *, beta: float,
                  kind: InvertLoss = "logistic") -> jax.Array:  # fmt: skip
    """Per-pair loss on the FLIPPED pair (y_l preferred over y_w): float32[B].

    chosen_ratio_B / rejected_ratio_B: logratio(y_w) / logratio(y_l) as stored (nats).
    """
    margin = rejected_ratio_B - chosen_ratio_B  # the flipped pair's margin
    if kind == "logistic":
        return -jax.nn.log_sigmoid(beta * margin)
    if kind == "ipo":
        return (margin - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown TRACE invert loss {kind!r} (known: logistic, ipo)")


def dual_npo_losses(chosen_ratio_B: jax.Array, rejected_ratio_B: jax.Array, *, beta: float) -> jax.Array:
    """Per-pair dual NPO: ``-log s(-beta logratio(y_w)) - log s(-beta logratio(y_l))``: float32[B]."""
    return -jax.nn.log_sigmoid(-beta * chosen_ratio_B) - jax.nn.log_sigmoid(-beta * rejected_ratio_B)


def token_kl(ref_logp_BxLxV: jax.Array, policy_logp_BxLxV: jax.Array) -> jax.Array:
    """KL(pi_ref || pi_theta) per position from normalised log-probs over the vocabulary: float32[B, L] (nats).

    The reference is a constant (stop_gradient).
    """
    ref = jax.lax.stop_gradient(ref_logp_BxLxV.astype(jnp.float32))
    return jnp.sum(jnp.exp(ref) * (ref - policy_logp_BxLxV.astype(jnp.float32)), axis=-1)


def trace_token_terms(h_policy_BxLxD: jax.Array, unembed_policy_DxV: jax.Array, h_ref_BxLxD: jax.Array,
                      unembed_ref_DxV: jax.Array, tokens_BxL: jax.Array, scored: ScoredSlots, *, chunk: int = 0,
                      compute_dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    """The policy's and the reference's token log-probs and KL(pi_ref || pi_theta), from ONE logits block
    of each model per chunk: three float32[B, L] arrays (nats) in the token frame, 0 where not scored.

    ``kl_BxL[:, t]`` compares the two models' distributions over token t given its prefix (the
    distribution that scores token t, as in ``training.logprobs``); ``scored`` (``scored_slots``)
    picks the tokens, e.g. the responses only. Sequence chunks under a rematerialized ``lax.scan``
    hold one [B, chunk, V] block of each model's logits at a time. The reference side is a constant.
    """
    with jax.named_scope("logprobs"):
        return _trace_token_terms(h_policy_BxLxD, unembed_policy_DxV, h_ref_BxLxD, unembed_ref_DxV, tokens_BxL, scored,
                                  chunk, compute_dtype)  # fmt: skip


def _trace_token_terms(h_policy_BxLxD: jax.Array, unembed_policy_DxV: jax.Array, h_ref_BxLxD: jax.Array,
                       unembed_ref_DxV: jax.Array, tokens_BxL: jax.Array, scored: ScoredSlots, chunk: int,
                       compute_dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:  # fmt: skip
    wp = gathered_unembedding(unembed_policy_DxV, compute_dtype)
    wr = gathered_unembedding(jax.lax.stop_gradient(unembed_ref_DxV), compute_dtype)

    def block(hp: jax.Array, hr: jax.Array, tgt: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        lp = jax.nn.log_softmax(jnp.einsum("bcd,dv->bcv", hp.astype(compute_dtype), wp,
                                           preferred_element_type=jnp.float32), axis=-1)  # fmt: skip
        lr = jax.nn.log_softmax(jnp.einsum("bcd,dv->bcv", hr.astype(compute_dtype), wr,
                                           preferred_element_type=jnp.float32), axis=-1)  # fmt: skip
        at = lambda x: jnp.take_along_axis(x, tgt[..., None], axis=-1)[..., 0]  # noqa: E731
        return at(lp), at(lr), token_kl(lr, lp)

    src = scored.hidden_BxS
    out = chunk_scan(block, (gather_slots(h_policy_BxLxD, src), gather_slots(jax.lax.stop_gradient(h_ref_BxLxD), src),
                             gather_slots(tokens_BxL, scored.token_BxS)), chunk)  # fmt: skip
    return tuple(scatter_slots(x, scored, tokens_BxL.shape[1]) for x in out)


def trace_objective(
    policy_seq_2B: jax.Array,
    ref_seq_2B: jax.Array,
    kl_2BxL: jax.Array,
    loss_mask_2BxL: jax.Array,
    category_B: jax.Array,
    weight_B: jax.Array,
    *,
    beta: float = 0.3,
    alpha_kl: float = 0.1,
    invert_loss: InvertLoss = "logistic",
    rpo_alpha: float = 0.0,
    num_conflicts: Any = None,
    num_retained_tokens: Any = None,
    num_inverted_tokens: Any = None,
) -> tuple[jax.Array, Metrics]:
    """The TRACE loss on B pairs held as 2B interleaved rows (2i = y_w, 2i+1 = y_l, as stored).

    policy_seq_2B / ref_seq_2B: sequence log-probs (nats, summed over response tokens); kl_2BxL:
    per-token KL(pi_ref || pi_theta) (``trace_token_terms``), counted where loss_mask_2BxL is 1 and
    the pair is retained; category_B int32 (RETAIN / INVERT / SUPPRESS); weight_B float32 impact
    weights (mean 1 over conflicts, see the module docstring; ignored for retained pairs); rpo_alpha:
    weight of the anchor (0: the paper's objective).
    Returns ``(loss, metrics)``: loss/{invert,suppress,kl,total} (and loss/anchor_nll with the anchor),
    pairs/{retain,invert,suppress}, weight/{invert,suppress} (sums), rewards/flipped_accuracy.
    """
    b = category_B.shape[0]
    ratio = (policy_seq_2B - jax.lax.stop_gradient(ref_seq_2B)).reshape(b, 2)
    cw, cl = ratio[:, 0], ratio[:, 1]
    is_inv = (category_B == INVERT).astype(jnp.float32)
    is_sup = (category_B == SUPPRESS).astype(jnp.float32)
    is_ret = (category_B == RETAIN).astype(jnp.float32)
    n_conf = _count(is_inv + is_sup, num_conflicts)
    w = weight_B.astype(jnp.float32)
    # where() keeps a non-member pair's term (possibly inf/nan far from the reference) out of the gradient.
    inv = jnp.sum(jnp.where(is_inv > 0, w * invert_losses(cw, cl, beta=beta, kind=invert_loss), 0.0)) / n_conf
    sup = jnp.sum(jnp.where(is_sup > 0, w * dual_npo_losses(cw, cl, beta=beta), 0.0)) / n_conf
    tok = loss_mask_2BxL.astype(jnp.float32) * jnp.repeat(is_ret, 2)[:, None]
    n_tok = _count(tok, num_retained_tokens)
    kl = jnp.sum(jnp.where(tok > 0, kl_2BxL, 0.0)) / n_tok
    loss = inv + sup + alpha_kl * kl
    sg = jax.lax.stop_gradient
    extra = {}
    if rpo_alpha:
        inv_tokens = is_inv * jnp.sum(loss_mask_2BxL.astype(jnp.float32), axis=-1).reshape(b, 2)[:, 1]
        nll = jnp.sum(jnp.where(is_inv > 0, -w * policy_seq_2B.reshape(b, 2)[:, 1], 0.0)) / _count(inv_tokens, num_inverted_tokens)
        loss = loss + rpo_alpha * nll
        extra["loss/anchor_nll"] = sg(nll)
    n_inv = jnp.maximum(jnp.sum(is_inv), 1.0)
    metrics = {
        "loss/invert": sg(inv), "loss/suppress": sg(sup), "loss/kl": sg(kl), "loss/total": sg(loss),
        "pairs/retain": jnp.sum(is_ret), "pairs/invert": jnp.sum(is_inv), "pairs/suppress": jnp.sum(is_sup),
        "weight/invert": jnp.sum(w * is_inv), "weight/suppress": jnp.sum(w * is_sup),
        "rewards/flipped_accuracy": jnp.sum(sg((cl > cw).astype(jnp.float32)) * is_inv) / n_inv, **extra,
    }  # fmt: skip
    return loss, metrics
