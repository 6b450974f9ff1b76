"""The train step: ``train_step(state, batch, veto) -> (state, metrics)``, pure, jitted once per bucket shape.

One path for every configuration: merge the NNX graph with the state's parameters, run the decoder
to final hidden states, compute per-token log-probs of the response tokens in chunks (``logprobs``), get reference log-probs
(frozen copy behind ``stop_gradient``, or precomputed in the batch), apply the objective
(``losses``), clip + AdamW. With LoRA the differentiated ``params`` are the adapters and the
base is ``state.frozen``; the reference is that base (``state.model_params`` / ``zero_adapters``).
``loss.type: trace`` is TRACE (``realign.step.trace_loss``) on the same path. Gradient accumulation scans over ``train.micro_batches`` slices of the
batch; every micro-batch is normalised by the WHOLE batch's pair / token counts, so the accumulated
gradient equals the one-big-batch gradient. A non-finite loss or gradient norm leaves params and
optimizer untouched and counts (``nonfinite_in_row`` resets on the next finite step). The veto table
(CBD term b; None without it) is its own replicated, non-donated argument, as in decoding.

For AOT (``tracealign_jax.aot``): ``train_step_fn_and_shardings(cfg, mesh, rules, bucket_len)``
returns the exact jitted step plus the abstract state and batch it compiles for::

    step_fn, abs_state, abs_batch = train_step_fn_and_shardings(cfg, mesh, rules, 128)
    compiled = step_fn.lower(abs_state, abs_batch, abs_veto_or_None).compile()
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracealign_jax import sharding
from tracealign_jax.config import Config
from tracealign_jax.training import losses
from tracealign_jax.training.data import row_length
from tracealign_jax.training.logprobs import predecessor_slots, scored_slots, token_logprobs, veto_contexts
from tracealign_jax.training.state import (
    TrainState,
    abstract_train_state,
    graphdef_and_abstract_params,
    make_optimizer,
    make_schedule,
    model_params,
    state_shardings,
    zero_adapters,
)

Batch = dict[str, jax.Array]
BATCH_AXES = ("batch", "length")
PAIR_FIELDS = {"category": jnp.int32, "weight": jnp.float32}  # TRACE: one per pair, [B] on the "batch" axis


def pair_layout(cfg: Config) -> str:
    """``data.pair_layout`` for DPO; SFT rows hold one response and the TRACE objective scores chosen and
    rejected rows apart, so both always ``separate``."""
    return cfg.data.pair_layout if cfg.train.objective == "dpo" and cfg.loss.type != "trace" else "separate"


def batch_rows(cfg: Config) -> int:
    """Rows per global batch: 1 per pair (shared_prompt) or 2 (separate: chosen, rejected) for DPO,
    1 per example for SFT."""
    return cfg.train.batch_size * (2 if pair_layout(cfg) == "separate" and cfg.train.objective == "dpo" else 1)


def batch_length(cfg: Config, bucket_len: int) -> int:
    """Row length of a batch of bucket ``bucket_len`` in this config's layout (``data.row_length``)."""
    return row_length(bucket_len, pair_layout(cfg), cfg.data.max_response_len)


def batch_fields(cfg: Config) -> dict[str, jnp.dtype]:
    """The device-side batch fields for this config (see ``training.data`` for their meaning)."""
    fields = {"tokens": jnp.int32, "positions": jnp.int32, "valid": jnp.bool_, "loss_mask": jnp.float32}
    if pair_layout(cfg) == "shared_prompt":
        fields["branch"] = jnp.int32
    if cfg.loss.type == "trace":
        return {**fields, **PAIR_FIELDS}
    if cfg.train.objective == "dpo":
        fields["bci"] = jnp.float32
        if cfg.loss.reference == "precomputed":
            fields["ref_logps"] = jnp.float32
    return fields


def batch_shardings(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> dict[str, NamedSharding]:
    spec = sharding.named_sharding(mesh, rules, BATCH_AXES)
    pairs = sharding.named_sharding(mesh, rules, BATCH_AXES[:1])
    return {k: pairs if k in PAIR_FIELDS else spec for k in batch_fields(cfg)}


def abstract_batch(cfg: Config, mesh: Mesh, rules: sharding.Rules, bucket_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs (with shardings) of one global batch of bucket ``bucket_len`` (``batch_length``)."""
    shape = (batch_rows(cfg), batch_length(cfg, bucket_len))
    sh = batch_shardings(cfg, mesh, rules)
    return {k: jax.ShapeDtypeStruct((cfg.train.batch_size,) if k in PAIR_FIELDS else shape, dt, sharding=sh[k])
            for k, dt in batch_fields(cfg).items()}  # fmt: skip


def response_slots(cfg: Config) -> int:
    """Log-prob slots per batch row: the response tokens a row can hold (``data.max_response_len``,
    twice for shared-prompt pair rows). Prompt tokens are never scored, so their logits are never
    computed (``logprobs.scored_slots``; every slot when this is at least the row length)."""
    return cfg.data.max_response_len * (2 if pair_layout(cfg) == "shared_prompt" else 1)


def unembedded_tokens(cfg: Config, rows: int, length: int) -> int:
    """Token slots a step over ``rows`` rows of ``length`` sends through the LM head (for the FLOPs count)."""
    return rows * min(length, response_slots(cfg))


def _forward_logps(graphdef: nnx.GraphDef, params: Any, batch: Batch, chunk: int, entry_ids: jax.Array | None,
                   attention: str = "einsum", key: jax.Array | None = None, response_slots: int = 0):  # fmt: skip
    """Per-token log-probs (and veto-entry log-probs) of the batch rows, in the batch's own layout, on
    the loss-masked tokens in ``response_slots`` slots per row (0: every token); ``key`` turns on LoRA
    dropout."""
    model = nnx.merge(graphdef, params)
    branch = batch.get("branch")
    h, _ = model.hidden(batch["tokens"], batch["positions"], batch["valid"], dropout_key=key, branch_BxL=branch,
                        attention=attention)  # fmt: skip
    scored = scored_slots(batch["tokens"], branch, batch.get("loss_mask"), response_slots)
    return token_logprobs(h, model.unembedding_matrix(), batch["tokens"], scored, chunk=chunk, entry_ids_BxLxM=entry_ids,
                          compute_dtype=model.dtype)  # fmt: skip


def _pair_rows(batch: Batch, *xs: Any) -> tuple[Any, ...]:
    """Shared-prompt rows [B, L, ...] -> the losses' interleaved pair rows [2B, L, ...] (row 2i chosen,
    2i+1 rejected): arrays repeated, the loss mask keeping each row's own response; as-is when separate.
    Returns (loss_mask, *xs); None stays None."""
    if "branch" not in batch:
        return (batch["loss_mask"], *xs)
    branch, mask = batch["branch"], batch["loss_mask"].astype(jnp.float32)
    mask_2BxL = jnp.stack([mask * (branch == 1), mask * (branch == 2)], axis=1).reshape((-1,) + mask.shape[1:])
    return (mask_2BxL, *(None if x is None else jnp.repeat(x, 2, axis=0) for x in xs))


def _veto_lookup(cfg: Config, veto: Any, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Veto entries (ids, penalties, valid), each [B, L, M], for every position's prefix."""
    tokens = batch["tokens"]
    from tracealign_jax.veto.table import unique_slots, veto_candidates

    r, l = tokens.shape
    branch = batch.get("branch")
    ctx, n = veto_contexts(tokens, veto.context_len, None if branch is None else predecessor_slots(branch))
    ids, pen, ok = veto_candidates(veto, ctx.reshape(r * l, -1), n.reshape(-1), cfg.loss.cbd_min_prefix)
    ok = unique_slots(ids, pen, ok)  # each vetoed token once, with its max penalty (as veto_entries)
    return ids.reshape(r, l, -1), pen.reshape(r, l, -1), ok.reshape(r, l, -1)


def loss_fn(params: Any, state: TrainState, batch: Batch, veto: Any, counts: dict[str, jax.Array], *, cfg: Config,
            graphdef: nnx.GraphDef) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """The objective on one (micro-)batch, normalised by the global ``counts``; ``params`` are the
    differentiated ones (the adapters with LoRA, merged here with ``state.frozen``)."""
    chunk = cfg.train.logprob_chunk
    # LoRA dropout: keys from (seed, step), so the state carries no RNG and a resume replays them.
    key = jax.random.fold_in(jax.random.key(cfg.train.seed), state.step) if cfg.lora.rank and cfg.lora.dropout else None
    if cfg.loss.type == "trace":
        from tracealign_jax.realign.step import trace_loss

        return trace_loss(params, state.frozen, batch, key, graphdef=graphdef, rc=cfg.realign, chunk=chunk,
                          attention=cfg.model.attention, response_slots=response_slots(cfg))
    policy = model_params(params, state.frozen)
    if cfg.train.objective == "sft":
        logps, _ = _forward_logps(graphdef, policy, batch, chunk, None, cfg.model.attention, key, response_slots(cfg))
        with jax.named_scope("loss"):
            return losses.sft_objective(logps, batch["loss_mask"], counts["tokens"])
    entry_ids = None
    if cfg.loss.cbd_cont_weight:
        if veto is None:
            raise ValueError("loss.cbd_cont_weight > 0 needs a veto table (loss.cbd_veto_table)")
        with jax.named_scope("veto"):
            entry_ids, pen, ok = _veto_lookup(cfg, veto, batch)
    attention, slots = cfg.model.attention, response_slots(cfg)
    logps, entry_logps = _forward_logps(graphdef, policy, batch, chunk, entry_ids, attention, key, slots)
    if cfg.loss.reference == "precomputed":
        ref = batch["ref_logps"]
    else:
        ref_params = state.ref_params if state.frozen is None else model_params(zero_adapters(params), state.frozen)
        with jax.named_scope("reference"):
            ref, ref_entry_logps = _forward_logps(graphdef, ref_params, batch, chunk, entry_ids, attention, None, slots)
    entries = None
    if entry_ids is not None:
        entries = _pair_rows(batch, entry_logps, jax.lax.stop_gradient(ref_entry_logps), pen, ok)[1:]
    with jax.named_scope("loss"):
        mask, logps, ref, bci = _pair_rows(batch, logps, jax.lax.stop_gradient(ref), batch["bci"])
        return losses.dpo_objective(cfg.loss, logps, ref, mask, bci, entries,
                                    counts["pairs"], counts["tokens"], counts["chosen_tokens"])  # fmt: skip


def _counts(cfg: Config, batch: Batch) -> dict[str, jax.Array]:
    mask = _pair_rows(batch)[0].astype(jnp.float32)
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    if cfg.train.objective == "sft":
        return {"tokens": tokens}
    return {"pairs": jnp.asarray(mask.shape[0] // 2, jnp.float32), "tokens": tokens,
            "chosen_tokens": jnp.maximum(jnp.sum(mask[0::2]), 1.0)}  # fmt: skip


def train_step(state: TrainState, batch: Batch, veto: Any, *, cfg: Config,
               graphdef: nnx.GraphDef) -> tuple[TrainState, dict]:  # fmt: skip
    """One optimizer step on a global batch (pure; bind cfg and graphdef with functools.partial).

    veto: a ``VetoTable`` when ``loss.cbd_cont_weight`` > 0, else None. ``train.micro_batches`` is
    checked against the batch at config load (``config.validate``).
    """
    counts = _counts(cfg, batch)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg=cfg, graphdef=graphdef), has_aux=True)
    k = cfg.train.micro_batches
    if k <= 1:
        (loss, metrics), grads = grad_fn(state.params, state, batch, veto, counts)
    else:
        micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

        def body(carry, mb):
            (l, m), g = grad_fn(state.params, state, mb, veto, counts)
            acc_l, acc_m, acc_g = carry
            return (acc_l + l, jax.tree.map(jnp.add, acc_m, m), jax.tree.map(jnp.add, acc_g, g)), None

        shapes = jax.eval_shape(grad_fn, state.params, state, jax.tree.map(lambda x: x[0], micro), veto, counts)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        (loss, metrics, grads), _ = jax.lax.scan(body, (zeros[0][0], zeros[0][1], zeros[1]), micro)
    with jax.named_scope("optimizer"):
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = make_optimizer(cfg.train).update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + finite.astype(jnp.int32),
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1),
            nonfinite_total=state.nonfinite_total + bad,
        )
    metrics = dict(metrics)
    metrics.update(
        {"grad_norm": grad_norm, "lr": make_schedule(cfg.train)(state.step), "tokens": jnp.sum(batch["valid"].astype(jnp.float32)),
         "nonfinite": bad, "nonfinite_in_row": new_state.nonfinite_in_row, "skipped_total": new_state.nonfinite_total}
    )  # fmt: skip
    return new_state, metrics


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, mesh: Mesh, rules: sharding.Rules, state_sh: TrainState):
    """The jitted ``step(state, batch, veto)``: explicit in/out shardings, the state donated, the veto
    table (or None) replicated and not donated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    step = functools.partial(train_step, cfg=cfg, graphdef=graphdef)

    def traced(state: TrainState, batch: Batch, veto: Any):
        with sharding.use_mesh(mesh, rules):
            return step(state, batch, veto)

    return jax.jit(traced, in_shardings=(state_sh, batch_shardings(cfg, mesh, rules), replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))  # fmt: skip


def train_step_fn_and_shardings(cfg: Config, mesh: Mesh, rules: sharding.Rules, bucket_len: int):
    """(jitted step, abstract state, abstract batch): ``step.lower(state, batch, veto).compile()`` is the
    real step compiled for ``mesh`` (works for TPU topologies without the hardware)."""
    graphdef, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    abs_state = abstract_train_state(cfg, mesh, rules)
    fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    return fn, abs_state, abstract_batch(cfg, mesh, rules, bucket_len)
