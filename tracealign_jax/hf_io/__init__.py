"""Hugging Face checkpoints in and out: safetensors only, streamed tensor by tensor, no torch needed.

    load_hf(path, *, mesh=None, rules=None, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", scan_layers=True,
            progress=True) -> (Transformer, ModelArch)
    save_hf(model_or_state, arch, out_dir, tokenizer_dir=None, max_shard_bytes=5 GiB, *, dtype=None,
            generation_config=None, overwrite=False, progress=True) -> Path
    convert_hf(in_dir, out_dir, *, dtype=None, tokenizer_dir=None, max_shard_bytes=5 GiB, overwrite=False)
        -> (Path, ModelArch, dtype)   # file to file, no device, one tensor in memory at a time
"""

from tracealign_jax.hf_io.keymap import TensorMap, tensor_maps
from tracealign_jax.hf_io.load import PickleCheckpointError, load_hf, weight_files
from tracealign_jax.hf_io.save import flat_params, save_hf, write_hf_dir
from tracealign_jax.hf_io.convert import convert_hf

__all__ = [
    "load_hf", "save_hf", "convert_hf", "write_hf_dir", "tensor_maps", "TensorMap", "PickleCheckpointError",
    "weight_files", "flat_params",
]
