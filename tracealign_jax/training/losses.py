"""DPO-family preference losses, the SFT objective and the two CBD terms: pure functions of arrays.

Inputs are log-probabilities (nats, from ``training.logprobs``), masks and BCI arrays; every function
returns ``(loss, metrics)``. Each term is a SUM divided by a count the caller passes (``num_pairs``,
``num_tokens``, ``num_chosen_tokens``; default: the arrays at hand). The train step passes the whole
batch's counts to every micro-batch, so accumulated micro-batches equal the big batch (not TRL's
mean of micro-batch means).

``logratio = log pi(y|x) - log pi_ref(y|x)`` summed over response tokens, ``margin_B =
logratio(chosen) - logratio(rejected)``, rewards ``beta * logratio``. Loss types (ls =
``loss.label_smoothing``, the cDPO epsilon: the assumed probability that a preference label is flipped):
sigmoid -(1-ls) log s(beta m) - ls log s(-beta m) (DPO; with ls > 0 conservative DPO, cDPO, on purpose:
TRL 1.16's sigmoid loss ignores label_smoothing, so for ls > 0 ours differs from it by ls beta m);
robust (-(1-ls) log s(beta m) + ls log s(-beta m)) / (1-2ls); hinge max(0, 1 - beta m) (SLiC);
ipo (m_avg - 1/(2 beta))^2 with m_avg from per-token-averaged logps (as TRL does).

CBD. The paper publishes no formula (its code adds a constant without gradient). Ours are two bounded
hinges weighted by w(b) = min(b / s, 1), s = ``cbd_bci_scale`` (the calibrated tau: raw BCIs reach
hundreds of nats and would swamp the preference loss):
  (a) L_a = sum_t w(b_t) max(0, logp_t - logp_ref_t + margin) / num_tokens over response tokens with
      per-token BCI b_t: high-BCI tokens end at least ``margin`` nats below the reference.
  (b) L_b = sum_t sum_m w(r_m) max(0, logp(v_m | prefix_t) - logp_ref(v_m | prefix_t) + margin)
      / num_tokens over the veto entries (v_m, r_m) of every response prefix: the same hinge on the
      policy's own next-token distribution. Unlike an expected penalty it stops once the margin is
      met, so it cannot push the policy into degenerate text that merely avoids vetoed tokens.
Total: L_pref + rpo_alpha NLL(chosen) + cbd_data_weight L_a + cbd_cont_weight L_b. A zero-weight
term is not traced, so CBD with both weights 0 is bit-for-bit plain DPO.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tracealign_jax.config import LossConfig

Metrics = dict[str, jax.Array]


def _count(mask: jax.Array, given: Any) -> jax.Array:
    """The normaliser: ``given`` if the caller passed one, else the number of True/1 entries (>= 1)."""
    if given is not None:
        return jnp.asarray(given, jnp.float32)
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def masked_sum(token_logps_BxL: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    """Per-row sum of token log-probs over masked positions: float32[B] (nats)."""
    return jnp.sum(token_logps_BxL * mask_BxL.astype(token_logps_BxL.dtype), axis=-1)


def preference_loss(
    policy_chosen_B: jax.Array,
    policy_rejected_B: jax.Array,
    ref_chosen_B: jax.Array,
    ref_rejected_B: jax.Array,
    *,
    loss_type: str,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_len_B: jax.Array | None = None,
    rejected_len_B: jax.Array | None = None,
    num_pairs: Any = None,
) -> tuple[jax.Array, Metrics]:
    """DPO-family loss over B pairs from sequence log-probs (float32[B], nats, summed over responses).

    ``chosen_len_B``/``rejected_len_B`` (response token counts) are needed by ``ipo``, which compares
    per-token-averaged log-ratios. Returns the loss SUM over pairs / ``num_pairs`` and metrics in the
    same normalisation: rewards/{chosen,rejected,margins,accuracies}, logps/{chosen,rejected}.
    """
    n = _count(jnp.ones_like(policy_chosen_B), num_pairs)
    chosen_ratio = policy_chosen_B - ref_chosen_B
    rejected_ratio = policy_rejected_B - ref_rejected_B
    margin = chosen_ratio - rejected_ratio
    ls = label_smoothing
    if loss_type == "sigmoid":
        per_pair = -(1.0 - ls) * jax.nn.log_sigmoid(beta * margin) - ls * jax.nn.log_sigmoid(-beta * margin)
    elif loss_type == "robust":
        if not 0.0 <= ls < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5) for robust DPO, got {ls}")
        per_pair = (-(1.0 - ls) * jax.nn.log_sigmoid(beta * margin) + ls * jax.nn.log_sigmoid(-beta * margin)) / (
            1.0 - 2.0 * ls
        )
    elif loss_type == "hinge":
        per_pair = jax.nn.relu(1.0 - beta * margin)
    elif loss_type == "ipo":
        if chosen_len_B is None or rejected_len_B is None:
            raise ValueError("ipo needs chosen_len_B and rejected_len_B (per-token averaged log-ratios)")
        avg_margin = chosen_ratio / jnp.maximum(chosen_len_B, 1.0) - rejected_ratio / jnp.maximum(rejected_len_B, 1.0)
        per_pair = (avg_margin - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss.type '{loss_type}' (known: sigmoid, robust, hinge, ipo)")
    chosen_reward = beta * jax.lax.stop_gradient(chosen_ratio)
    rejected_reward = beta * jax.lax.stop_gradient(rejected_ratio)
    metrics = {
        "rewards/chosen": jnp.sum(chosen_reward) / n,
        "rewards/rejected": jnp.sum(rejected_reward) / n,
        "rewards/margins": jnp.sum(chosen_reward - rejected_reward) / n,
        "rewards/accuracies": jnp.sum((chosen_reward > rejected_reward).astype(jnp.float32)) / n,
        "logps/chosen": jnp.sum(jax.lax.stop_gradient(policy_chosen_B)) / n,
        "logps/rejected": jnp.sum(jax.lax.stop_gradient(policy_rejected_B)) / n,
    }
    loss = jnp.sum(per_pair) / n
    metrics["loss/pref"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def nll_loss(token_logps_BxL: jax.Array, mask_BxL: jax.Array, num_tokens: Any = None) -> tuple[jax.Array, Metrics]:
    """Token-averaged negative log-likelihood of masked tokens (the SFT objective; RPO's chosen term)."""
    n = _count(mask_BxL, num_tokens)
    loss = -jnp.sum(token_logps_BxL * mask_BxL.astype(jnp.float32)) / n
    return loss, {"loss/nll": jax.lax.stop_gradient(loss)}


def bci_weights(bci: jax.Array, scale: float) -> jax.Array:
    """w(b) = min(b / scale, 1): BCI (nats, >= 0) mapped to a weight in [0, 1]; ``scale`` > 0 (nats)."""
    if not scale > 0:
        raise ValueError(f"loss.cbd_bci_scale must be > 0 (the calibrated tau, nats), got {scale}")
    return jnp.minimum(bci / scale, 1.0)


def cbd_data_loss(
    policy_logps_BxL: jax.Array,
    ref_logps_BxL: jax.Array,
    mask_BxL: jax.Array,
    bci_BxL: jax.Array,
    margin: float,
    scale: float,
    num_tokens: Any = None,
) -> tuple[jax.Array, Metrics]:
    """CBD term (a): ``sum w(b_t) max(0, logp_t - logp_ref_t + margin) / num_tokens`` over masked tokens.

    bci_BxL: float32 per-token BCI (nats, >= 0) of the response tokens; ``scale``: w(b) = min(b/scale, 1);
    the reference is constant.
    """
    n = _count(mask_BxL, num_tokens)
    m = mask_BxL.astype(jnp.float32)
    gap = policy_logps_BxL - jax.lax.stop_gradient(ref_logps_BxL) + margin
    hinge = jax.nn.relu(gap) * bci_weights(bci_BxL, scale) * m
    loss = jnp.sum(hinge) / n
    flagged = (bci_BxL > 0).astype(jnp.float32) * m
    metrics = {
        "loss/cbd_data": jax.lax.stop_gradient(loss),
        "bci/mean": jnp.sum(bci_BxL * m) / n,
        "bci/flagged_frac": jnp.sum(flagged) / n,
        "bci/active_frac": jnp.sum((gap > 0).astype(jnp.float32) * flagged) / n,
    }
    return loss, metrics


def cbd_continuation_loss(
    entry_logps_BxLxM: jax.Array,
    ref_entry_logps_BxLxM: jax.Array,
    penalties_BxLxM: jax.Array,
    valid_BxLxM: jax.Array,
    mask_BxL: jax.Array,
    margin: float,
    scale: float,
    num_tokens: Any = None,
) -> tuple[jax.Array, Metrics]:
    """CBD term (b): ``sum_t sum_e w(r_e) max(0, logp(v_e) - logp_ref(v_e) + margin) / num_tokens``.

    entry_logps_BxLxM / ref_entry_logps_BxLxM: the policy's / reference's log-prob (nats) of each veto
    entry's token at each position; penalties_BxLxM: its penalty (BCI, nats); valid_BxLxM: real
    entries; mask_BxL: positions that count.
    """
    n = _count(mask_BxL, num_tokens)
    w = valid_BxLxM.astype(jnp.float32) * mask_BxL.astype(jnp.float32)[..., None]
    gap = entry_logps_BxLxM - jax.lax.stop_gradient(ref_entry_logps_BxLxM) + margin
    # a masked-out entry's log-prob may be anything (padding ids); where() keeps its gradient exactly 0.
    hinge = jnp.where(w > 0, jax.nn.relu(gap), 0.0)
    loss = jnp.sum(hinge * bci_weights(penalties_BxLxM, scale) * w) / n
    probs = jnp.where(w > 0, jnp.exp(entry_logps_BxLxM), 0.0)
    return loss, {
        "loss/cbd_cont": jax.lax.stop_gradient(loss),
        "bci/veto_mass": jax.lax.stop_gradient(jnp.sum(probs) / n),
        "bci/veto_active_frac": jax.lax.stop_gradient(jnp.sum((gap > 0) * w) / jnp.maximum(jnp.sum(w), 1.0)),
    }


def dpo_objective(
    cfg: LossConfig,
    policy_logps_2BxL: jax.Array,
    ref_logps_2BxL: jax.Array,
    loss_mask_2BxL: jax.Array,
    bci_2BxL: jax.Array | None = None,
    veto: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    num_pairs: Any = None,
    num_tokens: Any = None,
    num_chosen_tokens: Any = None,
) -> tuple[jax.Array, Metrics]:
    """The full training loss on 2B interleaved rows: row 2i is pair i's chosen response, 2i+1 its rejected.

    policy/ref_logps_2BxL: per-token log-probs of each row's tokens (nats; position t scores token t);
    loss_mask_2BxL: 1 on response tokens. bci_2BxL: per-token BCI for CBD (a). veto: the CBD (b)
    arrays ``(entry_logps_2BxLxM, ref_entry_logps_2BxLxM, penalties_2BxLxM, valid_2BxLxM)``. Counts default to the arrays'
    own; the step passes the global batch's. Returns ``(loss, metrics)`` with every term reported.
    """
    b = policy_logps_2BxL.shape[0] // 2
    mask = loss_mask_2BxL.astype(jnp.float32)
    seq_policy = masked_sum(policy_logps_2BxL, mask).reshape(b, 2)
    seq_ref = masked_sum(jax.lax.stop_gradient(ref_logps_2BxL), mask).reshape(b, 2)
    lens = jnp.sum(mask, axis=-1).reshape(b, 2)
    loss, metrics = preference_loss(
        seq_policy[:, 0], seq_policy[:, 1], seq_ref[:, 0], seq_ref[:, 1],
        loss_type=cfg.type, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
        chosen_len_B=lens[:, 0], rejected_len_B=lens[:, 1], num_pairs=num_pairs,
    )  # fmt: skip
    if cfg.rpo_alpha:
        nll, m = nll_loss(policy_logps_2BxL[0::2], mask[0::2], num_chosen_tokens)
        loss = loss + cfg.rpo_alpha * nll
        metrics.update(m)
    if cfg.cbd_data_weight:
        if bci_2BxL is None:
            raise ValueError("loss.cbd_data_weight > 0 needs per-token BCI arrays (data.bci_path)")
        term, m = cbd_data_loss(policy_logps_2BxL, ref_logps_2BxL, mask, bci_2BxL, cfg.cbd_margin, cfg.cbd_bci_scale,
                                num_tokens)
        loss = loss + cfg.cbd_data_weight * term
        metrics.update(m)
    if cfg.cbd_cont_weight:
        if veto is None:
            raise ValueError("loss.cbd_cont_weight > 0 needs a provenance veto table (tracealign_jax.veto.table)")
        term, m = cbd_continuation_loss(*veto, mask, cfg.cbd_margin, cfg.cbd_bci_scale, num_tokens)
        loss = loss + cfg.cbd_cont_weight * term
        metrics.update(m)
    metrics["loss/total"] = jax.lax.stop_gradient(loss)
    return loss, metrics


def sft_objective(policy_logps_BxL: jax.Array, loss_mask_BxL: jax.Array, num_tokens: Any = None) -> tuple[jax.Array, Metrics]:
    """Supervised fine-tuning (used to train the reference model): token-mean NLL of the responses."""
    loss, metrics = nll_loss(policy_logps_BxL, loss_mask_BxL, num_tokens)
    metrics["loss/total"] = jax.lax.stop_gradient(loss)
    return loss, metrics
