"""Export to a directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads, without torch.

Writes PyTorch-layout safetensors (``metadata={"format": "pt"}``, HF tensor names), split into
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` above ``max_shard_bytes``,
plus ``config.json``, ``generation_config.json``, the tokenizer files when given, and a
``manifest.json`` of checksums. Tensors stream one layer slice at a time from the devices to the
file (a whole stacked weight only when under 512 MiB), so host memory is bounded whatever the
model size. The directory appears atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from tracealign_jax.atomic_io import atomic_directory, atomic_write_json, write_manifest
from tracealign_jax.hf_io.keymap import tensor_maps
from tracealign_jax.hf_io.load import INDEX_FILE, SINGLE_FILE
from tracealign_jax.hf_io.safetensors_file import TensorPlan, write_safetensors
from tracealign_jax.model import ModelArch

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
HOST_COPY_BYTES = 512 * 1024**2
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_TORCH_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def flat_params(model_or_state: Any) -> dict[str, jax.Array]:
    """Our dotted parameter paths -> arrays, from a Transformer, an nnx.State or such a dict."""
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    elif isinstance(model_or_state, nnx.State):
        state = model_or_state
    else:  # a dict: flat {"layers.wq": array} or nested {"layers": {"wq": array}} (e.g. from Orbax)
        flat: dict[str, jax.Array] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, Mapping):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                flat[prefix] = node.get_value() if isinstance(node, nnx.Variable) else node

        walk("", model_or_state)
        return flat
    return {
        ".".join(str(k) for k in path): (var.get_value() if isinstance(var, nnx.Variable) else var)
        for path, var in nnx.to_flat_state(state)
    }


def _to_host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@jax.jit
def _take_layer(stacked: jax.Array, layer: jax.Array) -> jax.Array:
    # A traced layer index: one compile per parameter shape, not one per layer.
    return jax.lax.dynamic_index_in_dim(stacked, layer, axis=0, keepdims=False)


class _LayerSource:
    """Per-layer host copies of one stacked parameter: a small one is fetched once, a large one
    (above ``HOST_COPY_BYTES``) one layer at a time, so host memory stays bounded."""

    def __init__(self, array: jax.Array):
        self.array = array
        self._host: np.ndarray | None = None

    def layer(self, i: int) -> np.ndarray:
        if self.array.nbytes <= HOST_COPY_BYTES:
            if self._host is None:
                self._host = _to_host(self.array)
            out = self._host[i]
            if i == self.array.shape[0] - 1:
                self._host = None  # param-major order: this parameter is done
            return out
        return _to_host(_take_layer(self.array, jnp.int32(i)))


def _plan(params: Mapping[str, jax.Array], arch: ModelArch, dtype: np.dtype) -> list[TensorPlan]:
    """Write order: parameter-major (all layers of one weight in a row), so each stacked weight is
    read from the devices once."""
    plans: list[TensorPlan] = []
    for tmap in tensor_maps(arch):
        if tmap.path not in params:
            raise KeyError(f"parameter '{tmap.path}' missing from the model/state given to save_hf")
        array = params[tmap.path]
        if tmap.stacked:
            source = _LayerSource(array)
            for i, name in enumerate(tmap.hf_names(arch.num_hidden_layers)):
                plans.append((name, tmap.hf_shape, dtype, lambda s=source, i=i, t=tmap: t.to_hf(s.layer(i))))
        else:
            plans.append((tmap.hf_name, tmap.hf_shape, dtype, lambda a=array, t=tmap: t.to_hf(_to_host(a))))
    return plans


def _split(plans: list[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        nbytes = int(np.prod(plan[1])) * np.dtype(plan[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += nbytes
    return shards


def _dtype_name(dtype: str) -> str:
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"export dtype must be one of {sorted(_TORCH_DTYPE_NAMES)}, got {dtype!r}")
    return dtype


def save_hf(
    model_or_state: Any,
    arch: ModelArch,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    *,
    dtype: str | None = None,
    generation_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes the HF checkpoint directory ``out_dir`` from our parameters and returns it.

    dtype: stored weight dtype (float32 | bfloat16 | float16); default: the parameters' dtype.
    generation_config: extra ``generation_config.json`` fields (token ids come from ``arch``).
    """
    params = flat_params(model_or_state)
    if any(k.startswith("lora.") for k in params):
        raise ValueError("save_hf: the model carries LoRA adapters, which a HF checkpoint would silently drop; "
                         "fold them in first (model.lora.merge_adapter) or write a PEFT directory (save_peft_adapter)")
    dtype_name = _dtype_name(dtype or str(np.dtype(params["embed"].dtype)))
    plans = _plan(params, arch, np.dtype(jnp.dtype(dtype_name)))
    if jax.process_index() != 0:
        # Other processes only take part in the gathers of sharded arrays; process 0 writes.
        for plan in plans:
            plan[3]()
        return Path(out_dir)
    return write_hf_dir(plans, arch, out_dir, dtype_name, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes,
                        generation_config=generation_config, overwrite=overwrite, progress=progress)


def write_hf_dir(
    plans: list[TensorPlan],
    arch: ModelArch,
    out_dir: str | Path,
    dtype_name: str,
    *,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    generation_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Writes planned tensors (HF names and layout) plus config, generation config, tokenizer files
    and manifest into ``out_dir``, atomically."""
    shards = _split(plans, max_shard_bytes)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        bar = tqdm(total=len(plans), desc=f"export {out_dir.name}", disable=not progress, unit="tensor")
        names = [SINGLE_FILE] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
        total = 0
        for name, shard in zip(names, shards):
            def counted(plan: TensorPlan) -> TensorPlan:
                def produce() -> np.ndarray:
                    bar.update(1)
                    return plan[3]()
                return (plan[0], plan[1], plan[2], produce)

            total += write_safetensors(tmp / name, [counted(p) for p in shard], {"format": "pt"})
        bar.close()
        if len(shards) > 1:
            weight_map = {plan[0]: name for name, shard in zip(names, shards) for plan in shard}
            atomic_write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
        atomic_write_json(tmp / "config.json", arch.to_hf_dict(torch_dtype=_TORCH_DTYPE_NAMES[dtype_name]))
        gen = {"_from_model_config": True, "bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id,
               "pad_token_id": arch.pad_token_id}
        gen = {k: (list(v) if isinstance(v, tuple) else v) for k, v in {**gen, **(generation_config or {})}.items()}
        atomic_write_json(tmp / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        if tokenizer_dir is not None:
            copied = [f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
            if not copied:
                raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
            for f in copied:
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
        write_manifest(tmp, {"kind": "hf_export", "architecture": arch.architecture, "dtype": dtype_name})
    return out_dir
