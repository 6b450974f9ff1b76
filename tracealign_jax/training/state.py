"""The training state pytree, the optimizer, and how both are born sharded (or abstract, for AOT/restore).

``TrainState`` holds float32 master parameters (``model.param_dtype``), the optax state, the step,
an RNG key (raw uint32 key data, so it checkpoints as a plain array), the frozen reference
parameters (in the compute dtype; None when reference log-probs are precomputed) and the counters
of non-finite steps. The provenance veto table (CBD term b) rides along in ``veto`` as constant
device arrays; it is rebuilt from disk on resume, never checkpointed.

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
from tracealign_jax.config import Config, ModelConfig, TrainConfig
from tracealign_jax.model import ModelArch, Transformer, abstract_model, param_shardings


class TrainState(struct.PyTreeNode):
    """step int32[]; params nnx.State (master dtype); opt_state optax; rng uint32[2] key data;
    ref_params nnx.State in compute dtype or None; nonfinite_in_row / nonfinite_total int32[];
    veto: a provenance ``VetoTable`` or None (not checkpointed)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ref_params: Any
    nonfinite_in_row: jax.Array
    nonfinite_total: jax.Array
    veto: Any = None


def model_arch(cfg: ModelConfig) -> ModelArch:
    """The architecture: ``hf_dir``'s config.json with ``arch`` entries overriding, or ``arch`` alone."""
    if cfg.hf_dir:
        base = ModelArch.from_hf_dir(cfg.hf_dir).to_hf_dict()
        return ModelArch.from_hf_dict({**base, **cfg.arch})
    return ModelArch.from_hf_dict(cfg.arch)


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


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def graphdef_and_abstract_params(cfg: Config, mesh: Mesh, rules: sharding.Rules) -> tuple[nnx.GraphDef, Any]:
    mc = cfg.model
    return abstract_model(model_arch(mc), dtype=_dtype(mc.dtype), param_dtype=_dtype(mc.param_dtype),
                          remat=mc.remat, scan_layers=mc.scan_layers, mesh=mesh, rules=rules)  # fmt: skip


def _uses_ref_params(cfg: Config) -> bool:
    return cfg.train.objective == "dpo" and cfg.loss.reference == "in_step"


def state_shardings(cfg: Config, abstract_params: Any, mesh: Mesh, rules: sharding.Rules, veto: Any = None) -> TrainState:
    """NamedShardings of every TrainState field (same pytree structure as the state)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    p_sh = param_shardings(abstract_params, mesh, rules)
    opt_abs = jax.eval_shape(make_optimizer(cfg.train).init, abstract_params)
    return TrainState(
        step=replicated, params=p_sh, opt_state=_mirror_shardings(opt_abs, abstract_params, p_sh, replicated),
        rng=replicated, ref_params=p_sh if _uses_ref_params(cfg) else None,
        nonfinite_in_row=replicated, nonfinite_total=replicated,
        veto=None if veto is None else jax.tree.map(lambda _: replicated, veto),
    )  # fmt: skip


def _build(cfg: Config, params: Any, veto: Any) -> TrainState:
    compute = _dtype(cfg.model.dtype)
    ref = jax.tree.map(lambda p: jax.lax.stop_gradient(p).astype(compute), params) if _uses_ref_params(cfg) else None
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(cfg.train).init(params),
        rng=jax.random.key_data(jax.random.key(cfg.train.seed)), ref_params=ref,
        nonfinite_in_row=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32), veto=veto,
    )  # fmt: skip


def abstract_train_state(cfg: Config, mesh: Mesh, rules: sharding.Rules, veto: Any = None) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their NamedShardings (nothing allocated).

    Used by AOT compilation (``step.train_step_fn_and_shardings``) and as the Orbax restore target,
    so a checkpoint lands directly in the layout of *this* mesh.
    """
    _, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    shardings = state_shardings(cfg, abs_params, mesh, rules, veto)
    shapes = jax.eval_shape(lambda p, v: _build(cfg, p, v), abs_params, veto)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def init_train_state(cfg: Config, mesh: Mesh, rules: sharding.Rules, *, model: Transformer | None = None,
                     veto: Any = None) -> tuple[nnx.GraphDef, TrainState]:  # fmt: skip
    """(graphdef, state) born sharded: random init from ``cfg.train.seed`` (jitted with out_shardings,
    so no device holds a whole sharded weight) or the parameters of ``model`` (e.g. from ``load_hf``)."""
    graphdef, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    shardings = state_shardings(cfg, abs_params, mesh, rules, veto)
    if model is None:
        mc = cfg.model
        arch = model_arch(mc)

        def fresh(v: Any) -> TrainState:
            m = Transformer(arch, dtype=_dtype(mc.dtype), param_dtype=_dtype(mc.param_dtype), remat=mc.remat,
                            scan_layers=mc.scan_layers, rngs=nnx.Rngs(cfg.train.seed))  # fmt: skip
            return _build(cfg, nnx.split(m)[1], v)

        state = jax.jit(fresh, out_shardings=shardings)(veto)
    else:
        params = nnx.split(model)[1]
        params = jax.tree.map(lambda p, a: p.astype(a.dtype), params, abs_params)
        state = jax.jit(lambda p, v: _build(cfg, p, v), out_shardings=shardings)(params, veto)
    return graphdef, state
