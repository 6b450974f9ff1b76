"""The one way a run's ``ModelConfig`` becomes a decoder: architecture plus build options.

``model_arch`` reads the architecture (``hf_dir``'s config.json, which wins: an ``arch`` that disagrees
with it is refused, naming the fields);
``model_options`` the keyword arguments every constructor takes (dtype, param_dtype, remat,
scan_layers), so ``Transformer``, ``abstract_model``, ``init_model`` and ``hf_io.load_hf`` all
build the same model from one config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tracealign_jax import sharding
from tracealign_jax.config import ConfigError, ModelConfig
from tracealign_jax.model.config import ModelArch
from tracealign_jax.model.partitioning import abstract_model
from tracealign_jax.model.transformer import Transformer


# Fields that do not change what the decoder computes: a YAML may differ from the checkpoint in these.
_INERT_FIELDS = ("initializer_range", "torch_dtype")


def model_arch(cfg: ModelConfig) -> ModelArch:
    """The architecture: ``hf_dir``'s config.json, or ``arch`` alone when there is no ``hf_dir``.

    With both, the checkpoint wins: ``arch`` entries that would change the decoder are refused
    (``ConfigError`` naming each field, YAML value vs checkpoint value), never silently applied to
    weights trained with another architecture.
    """
    if not cfg.hf_dir:
        return ModelArch.from_hf_dict(cfg.arch)
    base = ModelArch.from_hf_dir(cfg.hf_dir)
    if not cfg.arch:
        return base
    merged = ModelArch.from_hf_dict({**base.to_hf_dict(), **cfg.arch})
    diffs = [f"{f.name}: model.arch has {getattr(merged, f.name)!r}, the checkpoint {getattr(base, f.name)!r}"
             for f in dataclasses.fields(ModelArch)
             if f.name not in _INERT_FIELDS and getattr(merged, f.name) != getattr(base, f.name)]
    if diffs:
        raise ConfigError(f"model.arch disagrees with {cfg.hf_dir}/config.json ({'; '.join(diffs)}): the checkpoint's "
                          "architecture is used; delete model.arch (or --set 'model.arch={}')", "model.arch")
    return base


def model_options(cfg: ModelConfig) -> dict[str, Any]:
    """``dtype``, ``param_dtype``, ``remat``, ``scan_layers``: the keyword arguments of every builder."""
    return {"dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype), "remat": cfg.remat,
            "scan_layers": cfg.scan_layers}  # fmt: skip


def build_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (eager; wrap in jit / eval_shape to place or skip allocation)."""
    return Transformer(model_arch(cfg), **model_options(cfg), rngs=nnx.Rngs(seed))


def abstract_model_from_config(cfg: ModelConfig, mesh: Mesh | None = None,
                               rules: sharding.Rules | None = None) -> tuple[nnx.GraphDef, nnx.State]:  # fmt: skip
    """(graphdef, abstract state with NamedShardings on ``mesh``) of the configured model; nothing allocated."""
    return abstract_model(model_arch(cfg), **model_options(cfg), mesh=mesh, rules=rules)
