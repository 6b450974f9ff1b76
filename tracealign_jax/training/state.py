"""The training state pytree, the optimizer, and how both are born sharded (or abstract, for AOT/restore).

``TrainState`` holds the trained float32 master parameters (``model.param_dtype``), the optax
state, the step, the frozen reference parameters (in the compute dtype; None when reference
log-probs are precomputed) and the counters of non-finite steps. The veto table (CBD term b) is
data, not state: the step takes it as its own argument.

With LoRA (``lora.rank`` > 0, any objective) ``params`` holds only the adapters (``model.lora``,
float32), so the optimizer and the checkpoints hold only them; the base model is ``frozen``
(``model.param_dtype``, bf16 allowed), carried through the step unchanged (donated and aliased,
never differentiated) and never checkpointed: it is rebuilt from ``model.hf_dir`` or the seed. The
reference is the base itself (adapters zeroed: B = 0 is the base bit for bit), so ``ref_params``
stays None. ``model_params(state.params, state.frozen)`` is the full model's state for ``nnx.merge``.

Shardings come from the parameters' logical axis metadata (``model.param_shardings``); the optimizer
moments mirror their parameter's sharding; scalars are replicated. ``abstract_train_state`` builds
the whole state as ``jax.ShapeDtypeStruct``s with those shardings (no allocation) for AOT compiles
and for Orbax restores onto any mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracealign_jax import sharding
from tracealign_jax.config import Config, TrainConfig
from tracealign_jax.model import Transformer, abstract_model_from_config, build_model, param_shardings


class TrainState(struct.PyTreeNode):
    """step int32[]; params nnx.State (master dtype; the adapters with LoRA); opt_state optax;
    ref_params nnx.State in compute dtype or None; nonfinite_in_row / nonfinite_total int32[];
    frozen: the LoRA base nnx.State or None (last: checkpoints store the state without it)."""

    step: jax.Array
    params: Any
    opt_state: Any
    ref_params: Any
    nonfinite_in_row: jax.Array
    nonfinite_total: jax.Array
    frozen: Any = None


def model_params(params: Any, frozen: Any) -> Any:
    """The whole model's nnx.State: ``params``, with the frozen LoRA base merged in when there is one."""
    return params if frozen is None else nnx.merge_state(frozen, params)


def zero_adapters(params: Any) -> Any:
    """The LoRA adapters zeroed behind stop_gradient: with them the model is its frozen base exactly."""
    return jax.tree.map(jnp.zeros_like, jax.lax.stop_gradient(params))


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup to ``learning_rate`` then cosine / linear decay to ``end_lr_ratio`` x, or constant."""
    peak, end = tc.learning_rate, tc.learning_rate * tc.end_lr_ratio
    decay_steps = max(tc.steps - tc.warmup_steps, 1)
    if tc.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=tc.end_lr_ratio)
    elif tc.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if tc.warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, tc.warmup_steps)
    return optax.join_schedules([warmup, decay], [tc.warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay only on matrices (not norms or biases)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=decay_mask)
    if tc.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), adamw)
    return adamw


def _mirror_shardings(tree: Any, params: Any, param_sh: Any, replicated: NamedSharding) -> Any:
    """Shardings for ``tree`` (e.g. an optax state): subtrees shaped like ``params`` take the
    parameter shardings, every other leaf is replicated."""
    pdef = jax.tree.structure(params)
    return jax.tree.map(
        # Leafless nodes (optax EmptyState, None) stay as they are, so the result has the state's structure.
        lambda sub: param_sh if jax.tree.structure(sub) == pdef else replicated if jax.tree.leaves(sub) else sub,
        tree,
        is_leaf=lambda x: jax.tree.structure(x) == pdef or not jax.tree.leaves(x) or isinstance(x, jax.ShapeDtypeStruct),
    )


def with_lora(model: Transformer, cfg: Config) -> Transformer:
    """``model`` with fresh adapters when ``lora.rank`` > 0 (seeded by ``train.seed``), else as is."""
    from tracealign_jax.model.lora import add_lora

    return add_lora(model, cfg.lora, seed=cfg.train.seed) if cfg.lora.rank else model


def split_params(model: Transformer, cfg: Config) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, trained params, frozen base or None): the adapters and the base with LoRA."""
    if not cfg.lora.rank:
        return (*nnx.split(model), None)
    from tracealign_jax.model.lora import split_adapter

    return split_adapter(model)


def _abstract_split(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> tuple[nnx.GraphDef, Any, Any]:
    """``split_params`` of the configured model as ShapeDtypeStructs carrying their NamedShardings."""
    if not cfg.lora.rank:
        return (*abstract_model_from_config(cfg.model, mesh, rules), None)
    graphdef, params, frozen = split_params(nnx.eval_shape(lambda: with_lora(build_model(cfg.model), cfg)), cfg)
    place = lambda tree: jax.tree.map(  # noqa: E731
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, param_shardings(tree, mesh, rules))
    return graphdef, place(params), place(frozen)


def graphdef_and_abstract_params(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, abstract trained params): the whole model's, or the adapters' with LoRA."""
    return _abstract_split(cfg, mesh, rules)[:2]


def _uses_ref_params(cfg: Config) -> bool:
    return cfg.train.objective == "dpo" and cfg.loss.reference == "in_step" and not cfg.lora.rank


def state_shardings(cfg: Config, abstract_params: Any, mesh: Mesh, rules: sharding.Rules) -> TrainState:
    """NamedShardings of every TrainState field (same pytree structure as the state)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = param_shardings(abstract_params, mesh, rules)
    opt_abs = jax.eval_shape(make_optimizer(cfg.train).init, abstract_params)
    frozen = _abstract_split(cfg, mesh, rules)[2]
    return TrainState(
        step=replicated, params=p_sh, opt_state=_mirror_shardings(opt_abs, abstract_params, p_sh, replicated),
        ref_params=p_sh if _uses_ref_params(cfg) else None, nonfinite_in_row=replicated, nonfinite_total=replicated,
        frozen=None if frozen is None else param_shardings(frozen, mesh, rules),
    )  # fmt: skip


def _build(cfg: Config, params: Any, frozen: Any = None) -> TrainState:
    compute = jnp.dtype(cfg.model.dtype)
    ref = jax.tree.map(lambda p: jax.lax.stop_gradient(p).astype(compute), params) if _uses_ref_params(cfg) else None
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(cfg.train).init(params),
        ref_params=ref, nonfinite_in_row=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32),
        frozen=frozen,
    )  # fmt: skip


def abstract_train_state(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their NamedShardings (nothing allocated).

    Used by AOT compilation (``step.train_step_fn_and_shardings``) and as the Orbax restore target,
    so a checkpoint lands directly in the layout of *this* mesh.
    """
    _, abs_params, abs_frozen = _abstract_split(cfg, mesh, rules)
    shardings = state_shardings(cfg, abs_params, mesh, rules)
    shapes = jax.eval_shape(lambda p, f: _build(cfg, p, f), abs_params, abs_frozen)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def initial_model(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> Transformer | None:
    """The HF checkpoint ``model.hf_dir`` loaded sharded, or None (random init from ``train.seed``)."""
    if not cfg.model.hf_dir:
        return None
    from tracealign_jax.hf_io import load_hf
    from tracealign_jax.model import model_options

    return load_hf(cfg.model.hf_dir, mesh=mesh, rules=rules, **model_options(cfg.model))[0]


def lora_base(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> Any:
    """The frozen base of a LoRA run (never checkpointed), rebuilt as the run built it, sharded."""
    return init_train_state(cfg, mesh, rules, model=initial_model(cfg, mesh, rules))[1].frozen


def init_train_state(cfg: Config, mesh: Mesh, rules: sharding.Rules, *,
                     model: Transformer | None = None) -> tuple[nnx.GraphDef, TrainState]:  # fmt: skip
    """(graphdef, state) born sharded: random init from ``cfg.train.seed`` (jitted with out_shardings,
    so no device holds a whole sharded weight) or the parameters of ``model`` (e.g. from ``load_hf``);
    with LoRA, fresh adapters on that base."""
    graphdef, abs_params, abs_frozen = _abstract_split(cfg, mesh, rules)
    shardings = state_shardings(cfg, abs_params, mesh, rules)
    if model is None:
        fresh = lambda: _build(cfg, *split_params(with_lora(build_model(cfg.model, cfg.train.seed), cfg), cfg)[1:])  # noqa: E731
        state = jax.jit(fresh, out_shardings=shardings)()
    else:
        _, params, frozen = split_params(with_lora(model, cfg), cfg)
        cast = lambda tree, like: jax.tree.map(lambda p, a: p.astype(a.dtype), tree, like)  # noqa: E731
        params = cast(params, abs_params)
        frozen = None if frozen is None else cast(frozen, abs_frozen)
        state = jax.jit(lambda p, f: _build(cfg, p, f), out_shardings=shardings)(params, frozen)
    return graphdef, state
