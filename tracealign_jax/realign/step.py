"""One TRACE optimizer step on LoRA adapters: ``trace_lora_step(state, base, batch) -> (state, metrics)``, pure.

The policy is the frozen base plus adapters; the reference is the base itself (the same merged
graph with B = 0, which is the base bit for bit: ``model.lora``), so no reference copy of the
weights exists. Only the adapter parameters are differentiated and held by the optimizer; the base
enters as a separate, non-donated argument (constant data, like the veto table). Per batch:

  policy / reference hidden states -> sequence log-probs (``training.logprobs``) and the token KL
  (``objective.chunked_token_kl``) -> ``objective.trace_objective`` -> clip + AdamW on the adapter.

Batch: the training layout (``training.data.build_batch``: tokens / positions / valid / loss_mask
[2B, L], rows 2i / 2i+1 = y_w / y_l as stored) plus ``category`` int32 [B] and ``weight`` float32 [B]
(``impact_weights``' ``weight_mean1``). Counts are the whole batch's (no micro-batching here).
Dropout keys derive from (seed, step), so the state carries no RNG. A non-finite loss or gradient
leaves adapter and optimizer untouched and counts, as in ``training.step``.

This module is not yet wired into ``training.loop`` (``loss.type: trace``): the loop can call
``make_trace_lora_step`` once its state / data layout settles.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracealign_jax import sharding
from tracealign_jax.config import RealignConfig, TrainConfig
from tracealign_jax.model import param_shardings
from tracealign_jax.realign.objective import chunked_token_kl, trace_objective
from tracealign_jax.training.logprobs import chunked_token_logprobs
from tracealign_jax.training.state import make_optimizer, make_schedule

Batch = dict[str, jax.Array]
ROW_FIELDS = ("tokens", "positions", "valid", "loss_mask")
PAIR_FIELDS = ("category", "weight")


class LoRATrainState(struct.PyTreeNode):
    """step int32[]; adapter nnx.State of ``LoRAParam`` (float32 master); opt_state optax over the
    adapter only; nonfinite_in_row / nonfinite_total int32[]."""

    step: jax.Array
    adapter: Any
    opt_state: Any
    nonfinite_in_row: jax.Array
    nonfinite_total: jax.Array


def init_lora_state(adapter: Any, tc: TrainConfig) -> LoRATrainState:
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    return LoRATrainState(zero(), adapter, make_optimizer(tc).init(adapter), zero(), zero())


def _hidden(graphdef: nnx.GraphDef, adapter: Any, base: Any, batch: Batch, key: jax.Array | None):
    model = nnx.merge(graphdef, adapter, base)
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["valid"], dropout_key=key)
    return h, model.unembedding_matrix(), model.dtype


def trace_loss(adapter: Any, base: Any, batch: Batch, key: jax.Array | None, *, graphdef: nnx.GraphDef,
               rc: RealignConfig, chunk: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """The TRACE objective of the adapted policy against the base (the reference) on one batch."""
    no_adapter = jax.tree.map(lambda x: jnp.zeros_like(x), jax.lax.stop_gradient(adapter))
    h_ref, w_ref, dtype = _hidden(graphdef, no_adapter, base, batch, None)
    h_ref, w_ref = jax.lax.stop_gradient(h_ref), jax.lax.stop_gradient(w_ref)
    h, w, _ = _hidden(graphdef, adapter, base, batch, key)
    tok = batch["tokens"]
    logps, _ = chunked_token_logprobs(h, w, tok, chunk=chunk, compute_dtype=dtype)
    ref_logps, _ = chunked_token_logprobs(h_ref, w_ref, tok, chunk=chunk, compute_dtype=dtype)
    mask = batch["loss_mask"].astype(jnp.float32)
    cat = batch["category"]
    if rc.alpha_kl:
        kl = chunked_token_kl(h, w, h_ref, w_ref, chunk=chunk, compute_dtype=dtype)
    else:
        kl = jnp.zeros_like(mask)
    return trace_objective(jnp.sum(logps * mask, -1), jnp.sum(ref_logps * mask, -1), kl, mask, cat, batch["weight"],
                           beta=rc.beta, alpha_kl=rc.alpha_kl, invert_loss=rc.invert_loss)  # fmt: skip


def trace_lora_step(state: LoRATrainState, base: Any, batch: Batch, *, graphdef: nnx.GraphDef, rc: RealignConfig,
                    tc: TrainConfig, dropout: bool, chunk: int = 0) -> tuple[LoRATrainState, dict[str, jax.Array]]:  # fmt: skip
    """One optimizer step on the adapter (pure; bind the keywords with functools.partial)."""
    key = jax.random.fold_in(jax.random.key(tc.seed), state.step) if dropout else None
    loss_fn = functools.partial(trace_loss, graphdef=graphdef, rc=rc, chunk=chunk)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.adapter, base, batch, key)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = make_optimizer(tc).update(grads, state.opt_state, state.adapter)
    new_adapter = optax.apply_updates(state.adapter, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    bad = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, adapter=keep(new_adapter, state.adapter), opt_state=keep(new_opt, state.opt_state),
        nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1), nonfinite_total=state.nonfinite_total + bad,
    )  # fmt: skip
    metrics = dict(metrics, grad_norm=grad_norm, lr=make_schedule(tc)(state.step), nonfinite=bad)
    return new_state, metrics


def make_trace_lora_step(graphdef: nnx.GraphDef, adapter: Any, base: Any, mesh: Mesh, rules: sharding.Rules, *,
                         rc: RealignConfig, tc: TrainConfig, dropout: bool, chunk: int = 0):  # fmt: skip
    """The jitted step with explicit shardings (from the parameters' logical axes), the state donated
    and the base not. Returns ``(step_fn, state_shardings, base_shardings, batch_shardings)``."""
    replicated = NamedSharding(mesh, PartitionSpec())
    a_sh = param_shardings(adapter, mesh, rules)
    b_sh = param_shardings(base, mesh, rules)
    opt_abs = jax.eval_shape(make_optimizer(tc).init, adapter)
    adef = jax.tree.structure(adapter)
    opt_sh = jax.tree.map(lambda sub: a_sh if jax.tree.structure(sub) == adef else replicated, opt_abs,
                          is_leaf=lambda x: jax.tree.structure(x) == adef or isinstance(x, jax.ShapeDtypeStruct))  # fmt: skip
    st_sh = LoRATrainState(replicated, a_sh, opt_sh, replicated, replicated)
    rows = sharding.named_sharding(mesh, rules, ("batch", "length"))
    pairs = sharding.named_sharding(mesh, rules, ("batch",))
    batch_sh = {**{k: rows for k in ROW_FIELDS}, **{k: pairs for k in PAIR_FIELDS}}
    step = functools.partial(trace_lora_step, graphdef=graphdef, rc=rc, tc=tc, dropout=dropout, chunk=chunk)

    def traced(state: LoRATrainState, base: Any, batch: Batch):
        with sharding.use_mesh(mesh, rules):
            return step(state, base, batch)

    fn = jax.jit(traced, in_shardings=(st_sh, b_sh, batch_sh), out_shardings=(st_sh, replicated), donate_argnums=(0,))
    return fn, st_sh, b_sh, batch_sh

