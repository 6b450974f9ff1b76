"""Load a Hugging Face checkpoint directory (safetensors only) into a ``Transformer``, born sharded.

Each parameter is created with ``jax.make_array_from_callback`` on its NamedSharding: the callback
reads just the requested shard from the memory-mapped safetensors file (layout conversion is done
on views), so a device receives only its slice and the host never holds a full copy of the model.

Pickle checkpoints (``pytorch_model.bin``, ``*.pt``) are refused: unpickling runs arbitrary code
from the file. Convert them once with safetensors' own tooling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from tqdm import tqdm

from tracealign_jax import sharding
from tracealign_jax.atomic_io import MANIFEST, read_manifest, verify_manifest
from tracealign_jax.hf_io.keymap import IGNORED_SUFFIXES, TensorMap, tensor_maps
from tracealign_jax.hf_io.safetensors_file import SafetensorsReader
from tracealign_jax.model import ModelArch, Transformer, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "pytorch_model.bin.index.json")


class PickleCheckpointError(ValueError):
    """The directory holds only pickle-format weights, which we refuse to unpickle."""


def weight_files(path: str | Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file, from the index or the single ``model.safetensors``."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index}: not a valid safetensors index (field 'weight_map': {err})") from err
        return {name: path / file for name, file in weight_map.items()}
    if (path / SINGLE_FILE).is_file():
        reader = SafetensorsReader(path / SINGLE_FILE)
        return {name: path / SINGLE_FILE for name in reader.keys()}
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        raise PickleCheckpointError(
            f"{path}: only pickle checkpoints found ({', '.join(pickles)}). Refusing to load them: unpickling "
            "executes arbitrary code stored in the file. Convert them to safetensors first, e.g. in a trusted "
            "environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)."
        )
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (not a Hugging Face safetensors checkpoint)")


class _Checkpoint:
    """Lazy per-file readers and the layer tensors of one parameter, checked against ``TensorMap``."""

    def __init__(self, path: Path, arch: ModelArch):
        self.files = weight_files(path)
        self.arch = arch
        self._readers: dict[Path, SafetensorsReader] = {}
        self.maps = tensor_maps(arch)
        expected = {n for m in self.maps for n in m.hf_names(arch.num_hidden_layers)}
        missing = sorted(expected - set(self.files))
        if missing:
            raise ValueError(f"{path}: checkpoint lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"required by its config.json ({arch.architecture})")
        extra = sorted(n for n in set(self.files) - expected if not n.endswith(IGNORED_SUFFIXES))
        if arch.tie_word_embeddings:
            extra = [n for n in extra if n != "lm_head.weight"]  # a tied copy, same values as embed
        if extra:
            raise ValueError(f"{path}: checkpoint has tensors this architecture does not use: {extra[:5]} "
                             "(wrong config.json, or an unsupported variant)")

    def tensor(self, name: str, tmap: TensorMap) -> np.ndarray:
        file = self.files[name]
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(file)
        reader = self._readers[file]
        if name not in reader.keys():
            raise ValueError(f"{file}: tensor '{name}' listed in the index is not in the file")
        if reader.shape(name) != tmap.hf_shape:
            raise ValueError(f"{file}: tensor '{name}' has shape {reader.shape(name)}, config.json implies {tmap.hf_shape}")
        return tmap.to_ours(reader.get(name))

    def read_slice(self, tmap: TensorMap, index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
        """Our-layout slice ``index`` of parameter ``tmap.path`` (stacked over layers if per-layer), in
        memory of its own: never a view of the memory-mapped file, which JAX may still be copying from
        after ``load_hf`` returns (the file rewritten in place meanwhile: SIGBUS, seen in CI)."""
        if not tmap.stacked:
            return np.array(self.tensor(tmap.hf_name, tmap)[index], dtype=dtype, copy=True)
        layers = range(self.arch.num_hidden_layers)[index[0]]
        parts = [np.asarray(self.tensor(tmap.hf_name.format(layer=i), tmap)[index[1:]], dtype=dtype) for i in layers]
        return np.stack(parts)


def verify_export(path: Path) -> None:
    """A directory we exported (``manifest.json`` of kind ``hf_export``) is checked file by file against its
    SHA-256s before loading: a flipped byte in a weight would otherwise load as a silently different model.
    Checkpoints from elsewhere carry no manifest and load as they are."""
    if not (path / MANIFEST).is_file():
        return
    manifest = read_manifest(path)
    if manifest.get("kind") == "hf_export":
        verify_manifest(path, checksums=True)


def _flat_paths(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def load_hf(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
    scan_layers: bool = True,
    progress: bool = True,
) -> tuple[Transformer, ModelArch]:
    """(model, arch) from a HF checkpoint dir; parameters cast to ``param_dtype``, placed by ``rules``
    on ``mesh`` (default: all on the first device). dtype / remat / scan_layers as ``Transformer``;
    a run passes ``**model.model_options(cfg.model)``."""
    path = Path(path)
    verify_export(path)
    arch = ModelArch.from_hf_dir(path)
    checkpoint = _Checkpoint(path, arch)
    graphdef, abstract = abstract_model(arch, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers,
                                        mesh=mesh, rules=rules)  # fmt: skip
    variables = _flat_paths(abstract)
    by_path = {m.path: m for m in checkpoint.maps}
    if set(by_path) != set(variables):
        raise AssertionError(f"keymap and model disagree: {sorted(set(by_path) ^ set(variables))}")
    default = SingleDeviceSharding(jax.devices()[0])
    for name in tqdm(list(variables), desc=f"load {path.name}", disable=not progress, unit="tensor"):
        var, tmap = variables[name], by_path[name]
        spec = var.get_value()
        dt = np.dtype(spec.dtype)
        array = jax.make_array_from_callback(
            spec.shape, spec.sharding or default, lambda index, tmap=tmap, dt=dt: checkpoint.read_slice(tmap, index, dt)
        )
        var.set_value(array)
    model = nnx.merge(graphdef, abstract)
    return model, arch
