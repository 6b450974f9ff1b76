"""HF checkpoint -> HF checkpoint (dtype change, re-sharding of files), streamed tensor by tensor.

Nothing is placed on a device and no model is built: each tensor goes memory-mapped file -> our
layout (shape-checked against config.json by the same keymap as ``load_hf``) -> HF layout -> cast ->
output file, so converting a 70B checkpoint needs the memory of one tensor, not of the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from tracealign_jax.hf_io.load import _Checkpoint
from tracealign_jax.hf_io.safetensors_file import TensorPlan
from tracealign_jax.hf_io.save import DEFAULT_MAX_SHARD_BYTES, TOKENIZER_FILES, _dtype_name, write_hf_dir
from tracealign_jax.model import ModelArch


def convert_hf(
    in_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, ModelArch, str]:
    """Rewrites ``in_dir`` as ``out_dir`` in ``dtype`` (default: the source's torch_dtype); tokenizer
    files come from ``tokenizer_dir`` (default: ``in_dir`` when it has any) and the source's
    ``generation_config.json`` is kept. Returns (out_dir, arch, dtype)."""
    in_dir = Path(in_dir)
    arch = ModelArch.from_hf_dir(in_dir)
    source_dtype = arch.torch_dtype if arch.torch_dtype in ("float32", "bfloat16", "float16") else "float32"
    dtype_name = _dtype_name(dtype or source_dtype)
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    checkpoint = _Checkpoint(in_dir, arch)
    plans: list[TensorPlan] = []
    for tmap in checkpoint.maps:
        for name in tmap.hf_names(arch.num_hidden_layers):
            # to_ours then to_hf: the shape check and the keymap both run on every tensor.
            produce = lambda name=name, tmap=tmap: tmap.to_hf(checkpoint.tensor(name, tmap))
            plans.append((name, tmap.hf_shape, np_dtype, produce))
    generation: dict[str, Any] = {}
    if (in_dir / "generation_config.json").is_file():
        generation = json.loads((in_dir / "generation_config.json").read_text())
    if tokenizer_dir is None and any((in_dir / f).is_file() for f in TOKENIZER_FILES):
        tokenizer_dir = in_dir
    out = write_hf_dir(plans, arch, out_dir, dtype_name, tokenizer_dir=tokenizer_dir, max_shard_bytes=max_shard_bytes,
                       generation_config=generation, overwrite=overwrite, progress=progress)
    return out, arch, dtype_name
