"""LoRA adapters on the decoder's projections: y = x W + (alpha / r) * dropout(x) A B, W frozen.

Targets use the Hugging Face / PEFT module names (q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj). Each target's adapter is stacked over layers like its weight, in our layout:
``A [Ly, *in, r]`` and ``B [Ly, r, *out]`` where W is ``[Ly, *in, *out]`` (e.g. wq ``[Ly, D, H, E]``:
A ``[Ly, D, r]``, B ``[Ly, r, H, E]``; wo ``[Ly, H, E, D]``: A ``[Ly, H, E, r]``, B ``[Ly, r, D]``).
Logical axes: the weight's own names for its in / out dimensions, ``lora_rank`` (replicated: no
rule names it) for r, so ``model.param_shardings`` shards adapters like every other parameter.

Init (as PEFT's default): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), B = 0, so a fresh adapter leaves
the model's function unchanged exactly. Scale alpha / r (alpha / sqrt(r) with ``use_rslora``).
Adapters are ``LoRAParam`` variables (a ``nnx.Param`` subclass) in ``model.lora``, so
``split_adapter`` separates the trainable adapter state from the frozen base in one call.

Exports: ``merge_adapter`` folds the adapters into the base weights (for ``hf_io.save_hf``);
``save_peft_adapter`` writes a PEFT LoRA directory (``adapter_config.json`` +
``adapter_model.safetensors``, tensors ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
``[r, in]`` and ``...lora_B.weight`` ``[out, r]``, PyTorch Linear layout) that ``peft`` loads onto the
transformers base model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tracealign_jax.config import LORA_TARGETS, LoRAConfig
from tracealign_jax.model.config import ModelArch

# HF/PEFT module name -> (our weight, HF submodule, number of input axes in our layout)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q_proj": ("wq", "self_attn", 1),
    "k_proj": ("wk", "self_attn", 1),
    "v_proj": ("wv", "self_attn", 1),
    "o_proj": ("wo", "self_attn", 2),
    "gate_proj": ("w_gate", "mlp", 1),
    "up_proj": ("w_up", "mlp", 1),
    "down_proj": ("w_down", "mlp", 1),
}
ALL_TARGETS = LORA_TARGETS
assert set(TARGETS) == set(LORA_TARGETS)


class LoRAParam(nnx.Param):
    """A trainable adapter weight (the base model's ``nnx.Param``s stay frozen)."""


def _weight_axes(arch: ModelArch) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Our weight name -> (per-layer shape, logical axes) without the leading layer axis."""
    d, f = arch.hidden_size, arch.intermediate_size
    h, g, e = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    return {
        "wq": ((d, h, e), ("embed", "heads", "head_dim")),
        "wk": ((d, g, e), ("embed", "kv_heads", "head_dim")),
        "wv": ((d, g, e), ("embed", "kv_heads", "head_dim")),
        "wo": ((h, e, d), ("heads", "head_dim", "embed")),
        "w_gate": ((d, f), ("embed", "mlp")),
        "w_up": ((d, f), ("embed", "mlp")),
        "w_down": ((f, d), ("mlp", "embed")),
    }


class LoRAAdapters(nnx.Module):
    """Stacked adapters: attributes ``<weight>_a`` / ``<weight>_b`` (e.g. ``wq_a``, ``wq_b``)."""

    def __init__(self, arch: ModelArch, cfg: LoRAConfig, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if cfg.rank <= 0:
            raise ValueError("LoRAAdapters need lora.rank > 0")
        self.cfg = cfg
        n, r = arch.num_hidden_layers, cfg.rank
        shapes = _weight_axes(arch)
        for target in cfg.targets:
            w, _, n_in = TARGETS[target]
            shape, axes = shapes[w]
            fan_in = math.prod(shape[:n_in])
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(rngs.params(), (n, *shape[:n_in], r), jnp.float32, -bound, bound)
            setattr(self, f"{w}_a", LoRAParam(a.astype(param_dtype), logical_axes=("layers", *axes[:n_in], "lora_rank")))
            setattr(self, f"{w}_b", LoRAParam(jnp.zeros((n, r, *shape[n_in:]), param_dtype),
                                              logical_axes=("layers", "lora_rank", *axes[n_in:])))  # fmt: skip

    def arrays(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, LoRAParam)}


def add_lora(model: Any, cfg: LoRAConfig, *, seed: int = 0) -> Any:
    """Attaches fresh adapters to a ``Transformer`` (in place; returned for chaining).

    Adapters are float32 masters whatever the base's ``param_dtype`` (a frozen bf16 base is allowed)."""
    model.lora = LoRAAdapters(model.arch, cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    return model


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, n_in: int, cfg: LoRAConfig, dtype: Any,
               key: jax.Array | None) -> jax.Array:  # fmt: skip
    """``scale * dropout(x) A B`` for one layer: x [B, L, *in], a [*in, r], b [r, *out] -> [B, L, *out].

    Dropout (inverted, rate ``cfg.dropout``) applies only when a ``key`` is given (training).
    """
    if key is not None and cfg.dropout > 0:
        keep = jax.random.bernoulli(key, 1.0 - cfg.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.dropout), 0).astype(x.dtype)
    lead = x.shape[: x.ndim - n_in]
    xa = x.reshape(-1, math.prod(x.shape[x.ndim - n_in:])) @ a.astype(dtype).reshape(-1, a.shape[-1])
    y = xa @ b.astype(dtype).reshape(b.shape[0], -1)
    return (cfg.scale * y).astype(dtype).reshape(lead + b.shape[1:])


def split_adapter(model: Any) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, adapter state, frozen base state); ``nnx.merge(graphdef, adapter, base)`` rebuilds."""
    return nnx.split(model, LoRAParam, ...)


def merge_adapter(flat: Mapping[str, Any], cfg: LoRAConfig) -> dict[str, Any]:
    """Base weights with the adapters folded in: ``W + scale * A B`` (float32 accumulation).

    flat: dotted paths -> arrays, as ``hf_io.flat_params`` returns for a model with adapters
    (``layers.wq`` ..., ``lora.wq_a`` ...). Returns the base paths only (ready for ``hf_io.save_hf``).
    """
    out = {k: v for k, v in flat.items() if not k.startswith("lora.")}
    for target in cfg.targets:
        w, _, n_in = TARGETS[target]
        a, b, base = flat[f"lora.{w}_a"], flat[f"lora.{w}_b"], flat[f"layers.{w}"]
        n, r = a.shape[0], a.shape[-1]
        delta = jnp.einsum("nir,nro->nio", jnp.asarray(a, jnp.float32).reshape(n, -1, r),
                           jnp.asarray(b, jnp.float32).reshape(n, r, -1), precision=jax.lax.Precision.HIGHEST)  # fmt: skip
        out[f"layers.{w}"] = (jnp.asarray(base, jnp.float32) + cfg.scale * delta.reshape(base.shape)).astype(base.dtype)
    return out


def peft_tensors(flat: Mapping[str, Any], arch: ModelArch, cfg: LoRAConfig, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """PEFT state-dict names -> PyTorch-layout arrays (lora_A ``[r, in]``, lora_B ``[out, r]``)."""
    out = {}
    for target in cfg.targets:
        w, sub, _ = TARGETS[target]
        a, b = np.asarray(flat[f"lora.{w}_a"]), np.asarray(flat[f"lora.{w}_b"])
        r = a.shape[-1]
        for i in range(arch.num_hidden_layers):
            prefix = f"base_model.model.model.layers.{i}.{sub}.{target}"
            # ours [*in, r] / [r, *out], (h, e) flattened row-major as HF's h * E + e
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T, dtype)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T, dtype)
    return out


def peft_config(arch: ModelArch, cfg: LoRAConfig, base_model_name_or_path: str = "") -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT's LoraConfig reads (others take PEFT's defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": sorted(cfg.targets), "use_rslora": cfg.use_rslora,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path or None, "modules_to_save": None,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip


def save_peft_adapter(flat: Mapping[str, Any], arch: ModelArch, cfg: LoRAConfig, out_dir: str | Path, *,
                      base_model_name_or_path: str = "", dtype: str = "float32", overwrite: bool = False) -> Path:  # fmt: skip
    """Writes a PEFT LoRA adapter directory (atomically) and returns it.

    flat: ``hf_io.flat_params(model)`` of a model with adapters; dtype: stored dtype (float32 |
    bfloat16 | float16).
    """
    from tracealign_jax.atomic_io import atomic_directory, atomic_write_json, write_manifest
    from tracealign_jax.hf_io.safetensors_file import write_safetensors

    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = peft_tensors(flat, arch, cfg, np_dtype)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        plans = [(name, t.shape, np_dtype, lambda t=t: t) for name, t in sorted(tensors.items())]
        write_safetensors(tmp / "adapter_model.safetensors", plans, {"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", peft_config(arch, cfg, base_model_name_or_path))
        write_manifest(tmp, {"kind": "peft_lora", "architecture": arch.architecture, "rank": cfg.rank, "dtype": dtype})
    return out_dir
