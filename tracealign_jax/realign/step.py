"""The TRACE loss of the adapted policy on one batch: ``trace_loss(adapter, base, batch, key) -> (loss, metrics)``.

``loss.type: trace`` trains through the one training step (``training.step.loss_fn`` calls this):
the policy is the frozen base plus LoRA adapters; the reference is the base itself (the same graph
with the adapters zeroed, which is the base bit for bit: ``model.lora``), so no reference copy of
the weights exists. Per batch:

  policy / reference hidden states -> token log-probs of both models and their token KL on the
  response tokens, from one logits block per model (``objective.trace_token_terms``) ->
  ``objective.trace_objective``.

Batch: the training layout (``training.data.build_batch``: tokens / positions / valid / loss_mask
[2B, L], rows 2i / 2i+1 = y_w / y_l as stored) plus ``category`` int32 [B] and ``weight`` float32 [B]
(``impact_weights``' ``weight_mean1``; ``realign.data.pair_fields``). Counts are the batch's own
(``train.micro_batches`` is 1 for TRACE: ``config.validate``).
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from tracealign_jax.config import RealignConfig
from tracealign_jax.realign.objective import trace_objective, trace_token_terms
from tracealign_jax.training.logprobs import scored_slots
from tracealign_jax.training.state import model_params, zero_adapters

Batch = dict[str, jax.Array]


def _hidden(graphdef: nnx.GraphDef, params: Any, batch: Batch, key: jax.Array | None, attention: str):
    model = nnx.merge(graphdef, params)
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["valid"], dropout_key=key, attention=attention)
    return h, model.unembedding_matrix(), model.dtype


def trace_loss(adapter: Any, base: Any, batch: Batch, key: jax.Array | None, *, graphdef: nnx.GraphDef,
               rc: RealignConfig, chunk: int = 0, attention: str = "einsum",
               response_slots: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """The TRACE objective of ``base`` + ``adapter`` against ``base`` (the reference) on one batch;
    ``attention``: the ``model.attention`` kernel of both forwards; ``response_slots``: log-prob slots
    per row (the response tokens; 0 scores every token)."""
    with jax.named_scope("reference"):
        h_ref, w_ref, dtype = _hidden(graphdef, model_params(zero_adapters(adapter), base), batch, None, attention)
    h, w, _ = _hidden(graphdef, model_params(adapter, base), batch, key, attention)
    tok = batch["tokens"]
    mask = batch["loss_mask"].astype(jax.numpy.float32)
    scored = scored_slots(tok, None, mask, response_slots)
    logps, ref_logps, kl = trace_token_terms(h, w, h_ref, w_ref, tok, scored, chunk=chunk, compute_dtype=dtype)
    with jax.named_scope("loss"):
        return trace_objective((logps * mask).sum(-1), (ref_logps * mask).sum(-1), kl, mask, batch["category"],
                               batch["weight"], beta=rc.beta, alpha_kl=rc.alpha_kl, invert_loss=rc.invert_loss,
                               rpo_alpha=rc.rpo_alpha)  # fmt: skip
