"""HF import/export against PyTorch transformers: logits parity (<= 1e-4 in float32), export ->
``AutoModelForCausalLM.from_pretrained`` -> parity again, sharded files + index, bf16 export,
loading straight onto an 8-device mesh, and refusal of pickle checkpoints / unknown architectures."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf_tiny import VARIANTS, build_torch_model, random_tokens, save_torch_model, torch_logits
from tracealign_jax import cli, sharding
from tracealign_jax.config import MeshConfig
from tracealign_jax.hf_io import PickleCheckpointError, load_hf, save_hf

TOL = 1e-4  # float32 parity, never loosened
TOKENS = random_tokens(2, 12, seed=0)
POSITIONS = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    root = tmp_path_factory.mktemp("hf_tiny")
    return {v: (save_torch_model(m := build_torch_model(v), root / v), m) for v in VARIANTS}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions):
    return nnx.merge(graphdef, state)(tokens, positions)[0]


def logits_of(model) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(TOKENS), jnp.asarray(POSITIONS)))


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_and_export_match_torch(variant, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    path, torch_model = checkpoints[variant]
    model, arch = load_hf(path, progress=False)
    ref = torch_logits(torch_model, TOKENS)
    ours = logits_of(model)
    assert max_diff(ours, ref) <= TOL, f"{variant}: load parity {max_diff(ours, ref)}"
    assert np.abs(ref).max() > 2.0  # the comparison is not between near-zero logits

    out = save_hf(model, arch, tmp_path / "export", progress=False)
    reloaded_torch = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded_torch).__name__ == arch.architecture
    assert max_diff(torch_logits(reloaded_torch, TOKENS), ours) <= TOL
    for name, tensor in torch_model.state_dict().items():  # float32 export is bit-exact
        np.testing.assert_array_equal(reloaded_torch.state_dict()[name].numpy(), tensor.numpy(), err_msg=name)
    again, arch_again = load_hf(out, progress=False)
    assert arch_again == arch
    np.testing.assert_array_equal(logits_of(again), ours)


def test_sharded_export_with_index_and_tokenizer(checkpoints, tmp_path):
    from safetensors import safe_open
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")

    path, torch_model = checkpoints["qwen2"]
    model, arch = load_hf(path, progress=False)
    out = save_hf(model, arch, tmp_path / "sharded", tokenizer_dir=tmp_path / "tok", max_shard_bytes=60_000,
                  progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    state = torch_model.state_dict()
    assert set(index["weight_map"]) == set(state)
    total = 0
    for file in files:
        with safe_open(out / file, framework="np") as f:  # the reference reader accepts our files
            assert f.metadata() == {"format": "pt"}
            nbytes = 0
            for name in f.keys():
                assert index["weight_map"][name] == file
                np.testing.assert_array_equal(f.get_tensor(name), state[name].numpy())
                nbytes += f.get_tensor(name).nbytes
            # A file stays under the limit unless it holds one tensor larger than the limit (as HF).
            assert nbytes <= 60_000 or len(f.keys()) == 1
            total += nbytes
    assert index["metadata"]["total_size"] == total
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()
    assert PreTrainedTokenizerFast.from_pretrained(out)("hello world")["input_ids"] == [1, 2]
    assert json.loads((out / "generation_config.json").read_text()).get("eos_token_id") == arch.eos_token_id
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(torch_logits(reloaded, TOKENS), torch_logits(torch_model, TOKENS)) == 0.0
    again, _ = load_hf(out, progress=False)  # our reader over the sharded layout
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again)), nnx.to_flat_state(nnx.state(model))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))


def test_bfloat16_export_is_exact_rounding(checkpoints, tmp_path):
    import torch
    from safetensors.torch import load_file

    path, torch_model = checkpoints["llama3_tied"]
    model, arch = load_hf(path, progress=False)
    out = save_hf(model, arch, tmp_path / "bf16", dtype="bfloat16", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    stored = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied: written once, as HF does
    for name, tensor in torch_model.state_dict().items():
        if name in stored:
            assert stored[name].dtype == torch.bfloat16
            assert torch.equal(stored[name], tensor.to(torch.bfloat16)), name
    half, half_arch = load_hf(out, param_dtype=jnp.bfloat16, progress=False)
    assert half_arch.torch_dtype == "bfloat16" and half.layers.wq[...].dtype == jnp.bfloat16


def test_load_straight_onto_mesh_matches_single_device(checkpoints):
    path, torch_model = checkpoints["llama"]
    mesh = sharding.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = sharding.RULE_PRESETS["fsdp_tp"]
    model, arch = load_hf(path, mesh=mesh, rules=rules, progress=False)
    w_gate = model.layers.w_gate[...]
    assert w_gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in w_gate.addressable_shards} == {(2, 32, 64)}  # each device: its slice only
    assert model.embed[...].addressable_shards[0].data.shape == (256, 32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, positions):
        with sharding.use_mesh(mesh, rules):
            return nnx.merge(graphdef, state)(tokens, positions)[0]

    sharded = forward(state, jnp.asarray(TOKENS), jnp.asarray(POSITIONS))
    single, _ = load_hf(path, progress=False)
    assert max_diff(sharded, logits_of(single)) <= 1e-5
    assert max_diff(sharded, torch_logits(torch_model, TOKENS)) <= TOL


def test_pickle_checkpoint_is_refused(checkpoints, tmp_path):
    import torch

    path, torch_model = checkpoints["llama"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(PickleCheckpointError, match="pytorch_model.bin.*executes arbitrary code"):
        load_hf(tmp_path, progress=False)
    assert cli.main(["hf", "convert", "--in", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_and_inconsistent_checkpoints_are_refused(checkpoints, tmp_path):
    import shutil

    path, _ = checkpoints["llama"]
    config = json.loads((path / "config.json").read_text())
    for name, change, message in [
        ("gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture.*gpt2"),
        ("yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' is not supported"),
        ("wrong_shape", {"intermediate_size": 96}, r"mlp\.\w+_proj\.weight' has shape \(\d+, \d+\), config.json implies"),
        ("fewer_layers", {"num_hidden_layers": 1}, "does not use"),
    ]:
        bad = tmp_path / name
        shutil.copytree(path, bad)
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            load_hf(bad, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(tmp_path / "empty", progress=False)


def test_cli_convert_rewrites_dtype_and_files(checkpoints, tmp_path):
    path, torch_model = checkpoints["mistral"]
    out = tmp_path / "converted"
    assert cli.main(["hf", "convert", "--in", str(path), "--out", str(out), "--dtype", "bfloat16",
                     "--max-shard-bytes", "100000"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and (out / "manifest.json").is_file()
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (path / "generation_config.json").read_text())  # the source's generation settings are kept
    model, arch = load_hf(out, param_dtype=jnp.bfloat16, progress=False)
    assert arch.torch_dtype == "bfloat16" and arch.sliding_window == 4 and arch.head_dim == 24
    source, _ = load_hf(path, progress=False)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(source))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()).astype(jnp.bfloat16),
                                      err_msg=str(p))
    back = tmp_path / "back"  # bf16 -> f32 is exact, and a single file again
    assert cli.main(["hf", "convert", "--in", str(out), "--out", str(back), "--dtype", "float32"]) == 0
    assert (back / "model.safetensors").is_file() and not (back / "model.safetensors.index.json").exists()
    again, _ = load_hf(back, progress=False)
    np.testing.assert_array_equal(again.layers.wk[...], np.asarray(model.layers.wk[...]).astype(np.float32))


def test_load_hf_honours_the_configs_build_options(checkpoints):
    """``load_hf(**model_options(cfg.model))`` builds the configured model: unrolled layers and remat
    come through (they were dropped before), with the same parameters and logits as the default."""
    from tracealign_jax.config import ModelConfig
    from tracealign_jax.model import model_options

    path, torch_model = checkpoints["llama"]
    opts = model_options(ModelConfig(remat="full", scan_layers=False))
    model, _ = load_hf(path, progress=False, **opts)
    assert (model.scan_layers, model.remat) == (False, "full")
    default, _ = load_hf(path, progress=False)
    assert (default.scan_layers, default.remat) == (True, "none")
    np.testing.assert_array_equal(logits_of(model), logits_of(default))
    assert max_diff(logits_of(model), torch_logits(torch_model, TOKENS)) <= TOL


def test_loaded_slices_never_alias_the_memory_mapped_file(checkpoints):
    """Every slice load_hf hands to JAX owns its memory: JAX may copy from it after load_hf returns, and
    a view of the mapped file would then fault (SIGBUS) if the file were rewritten in place meanwhile."""
    from tracealign_jax.hf_io.load import _Checkpoint
    from tracealign_jax.model import ModelArch

    path = checkpoints["llama"][0]
    arch = ModelArch.from_hf_dir(path)
    ckpt = _Checkpoint(path, arch)
    for tmap in ckpt.maps:
        name = tmap.hf_name.format(layer=0) if tmap.stacked else tmap.hf_name
        ndim = ckpt.tensor(name, tmap).ndim + int(tmap.stacked)
        got = ckpt.read_slice(tmap, (slice(None),) * ndim, np.dtype(np.float32))
        assert got.dtype == np.float32
        for reader in ckpt._readers.values():
            assert not np.shares_memory(got, reader._map), tmap.path
