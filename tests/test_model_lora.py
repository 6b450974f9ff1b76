"""LoRA: a fresh adapter (B = 0) is the base model exactly; merging equals the adapter forward; a
training step moves only adapter parameters; the PEFT directory loads with ``peft`` onto the
transformers base and gives our logits; the merged export reloads in transformers with equal logits."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from hf_tiny import build_torch_model, random_tokens, save_torch_model, torch_logits
from tracealign_jax import sharding
from tracealign_jax.config import ConfigError, load_config
from tracealign_jax.hf_io import flat_params, load_hf, save_hf
from tracealign_jax.model import lora as L

TOL = 1e-4  # float32 parity with PyTorch, never loosened
TOKENS = random_tokens(2, 12, seed=0)
POSITIONS = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, key=None):
    return nnx.merge(graphdef, state)(tokens, positions, dropout_key=key)[0]


def logits_of(model, key=None) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, jnp.asarray(TOKENS), jnp.asarray(POSITIONS), key))


def randomize_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero B (a trained adapter), from the host RNG."""
    rng = np.random.default_rng(seed)
    for name, var in vars(model.lora).items():
        if isinstance(var, L.LoRAParam) and name.endswith("_b"):
            var.set_value(jnp.asarray(std * rng.standard_normal(var.shape), var.dtype))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_hf")
    return {v: (save_torch_model(m := build_torch_model(v), root / v), m) for v in ("llama", "mistral")}


def test_config_validation():
    assert L.LoRAConfig(rank=8, alpha=16).scale == 2.0
    assert L.LoRAConfig(rank=16, alpha=8, use_rslora=True).scale == 2.0
    with pytest.raises(ConfigError, match="unknown module"):
        L.LoRAConfig(rank=4, targets=("qkv",))
    with pytest.raises(ConfigError, match="lora.dropout"):
        L.LoRAConfig(rank=4, dropout=1.0)
    cfg = load_config(None, ["lora.rank=8", "lora.targets=[q_proj, v_proj]", "realign.invert_loss=ipo"])
    assert cfg.lora == L.LoRAConfig(rank=8, targets=("q_proj", "v_proj")) and cfg.realign.invert_loss == "ipo"
    assert (cfg.realign.beta, cfg.realign.alpha_kl, cfg.realign.gamma) == (0.3, 0.1, 1.0)  # the paper's defaults
    with pytest.raises(ConfigError, match="lora.rnk"):
        load_config(None, ["lora.rnk=8"])
    with pytest.raises(ConfigError, match="realign.beta"):
        load_config(None, ["realign.beta=0"])


def test_fresh_adapter_is_the_base_model_exactly_and_merge_equals_adapter_forward(checkpoints):
    model, arch = load_hf(checkpoints["mistral"][0], progress=False)  # head_dim 24 != 64 / 4
    base = logits_of(model)
    cfg = L.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    L.add_lora(model, cfg, seed=3)
    assert np.array_equal(logits_of(model), base)  # B = 0: bit-identical
    assert float(jnp.abs(model.lora.wq_a[...]).max()) > 0 and not hasattr(model.lora, "wk_a")
    randomize_b(model)
    adapted = logits_of(model)
    assert np.abs(adapted - base).max() > 1e-2  # the adapter really changes the function
    merged_flat = L.merge_adapter(flat_params(model), cfg)
    assert not any(k.startswith("lora.") for k in merged_flat)
    plain, _ = load_hf(checkpoints["mistral"][0], progress=False)
    graphdef, state = nnx.split(plain)
    for path, var in nnx.to_flat_state(state):
        var.set_value(merged_flat[".".join(map(str, path))])
    # W + s B A and x W + s (x A) B round differently in fp32; per element they differed by up to 1.8e-5
    # (4.7e-5 relative, at one logit of 12,288) on one CPU and not on another. 1e-5 of the logits' scale.
    merged = logits_of(nnx.merge(graphdef, state))
    assert np.abs(merged - adapted).max() <= 1e-5 * np.abs(adapted).max(), np.abs(merged - adapted).max()


def test_adapter_logical_axes_shard_like_their_weights(checkpoints):
    from tracealign_jax.model import param_shardings

    model, _ = load_hf(checkpoints["llama"][0], progress=False)
    L.add_lora(model, L.LoRAConfig(rank=4), seed=0)
    mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES)
    sh = param_shardings(nnx.state(model), mesh, sharding.RULE_PRESETS["fsdp_tp"])
    assert sh["lora"]["wq_a"].get_value().spec == PartitionSpec(None, "fsdp", None)
    assert sh["lora"]["wq_b"].get_value().spec == PartitionSpec(None, None, "tensor", None)
    assert sh["lora"]["wo_a"].get_value().spec == PartitionSpec(None, "tensor", None, None)
    assert sh["lora"]["w_down_b"].get_value().spec == PartitionSpec(None, None, "fsdp")


def test_training_step_changes_only_adapter_parameters(checkpoints):
    model, _ = load_hf(checkpoints["llama"][0], progress=False)
    L.add_lora(model, L.LoRAConfig(rank=4, alpha=8.0, dropout=0.1), seed=0)
    graphdef, adapter, base = L.split_adapter(model)
    assert {".".join(map(str, p)) for p, _ in nnx.to_flat_state(adapter)} == {
        f"lora.{w}_{s}" for w in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down") for s in "ab"}
    opt = optax.adamw(1e-2)
    tokens, positions = jnp.asarray(TOKENS), jnp.asarray(POSITIONS)

    @jax.jit
    def step(adapter, opt_state, base, key):
        def loss(ad):
            logits = nnx.merge(graphdef, ad, base)(tokens, positions, dropout_key=key)[0]
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

        value, grads = jax.value_and_grad(loss)(adapter)
        updates, opt_state = opt.update(grads, opt_state, adapter)
        return optax.apply_updates(adapter, updates), opt_state, value

    base_before = jax.tree.map(np.asarray, base)
    ad, opt_state = adapter, opt.init(adapter)
    assert jax.tree.leaves(opt_state) and all(  # optimizer moments exist for adapter leaves only
        x.shape in {a.shape for a in jax.tree.leaves(adapter)} or x.ndim == 0 for x in jax.tree.leaves(opt_state))
    losses = []
    for i in range(3):
        ad, opt_state, value = step(ad, opt_state, base, jax.random.key(i))
        losses.append(float(value))
    assert losses[-1] < losses[0]
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
        assert np.asarray(after).tobytes() == before.tobytes()  # base bit-identical
    moved = {".".join(map(str, p)): not np.array_equal(np.asarray(v.get_value()), np.asarray(a.get_value()))
             for (p, v), (_, a) in zip(nnx.to_flat_state(ad), nnx.to_flat_state(adapter))}
    assert all(moved.values()), moved
    # dropout is on only with a key: without one the forward is deterministic and differs from a keyed one
    trained = nnx.merge(graphdef, ad, base)
    assert np.array_equal(logits_of(trained), logits_of(trained))
    assert not np.array_equal(logits_of(trained), logits_of(trained, jax.random.key(9)))


@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_peft_directory_loads_with_peft_and_merged_export_with_transformers(variant, checkpoints, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, _ = checkpoints[variant]
    model, arch = load_hf(path, progress=False)
    cfg = L.LoRAConfig(rank=4, alpha=12.0)
    L.add_lora(model, cfg, seed=5)
    randomize_b(model, seed=6)
    ours = logits_of(model)
    flat = flat_params(model)

    out = L.save_peft_adapter(flat, arch, cfg, tmp_path / "adapter", base_model_name_or_path=str(path))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 12.0
    torch_base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(torch_base, out).eval()
    loaded = {k for k in peft_model.state_dict() if "lora_" in k}
    assert len(loaded) == 2 * 7 * arch.num_hidden_layers
    got = torch_logits(peft_model, TOKENS)
    assert np.abs(got - torch_logits(AutoModelForCausalLM.from_pretrained(path).eval(), TOKENS)).max() > 1e-2
    np.testing.assert_allclose(got, ours, rtol=0, atol=TOL)

    with pytest.raises(ValueError, match="LoRA adapters"):  # never a silent base-only export
        save_hf(model, arch, tmp_path / "unmerged", progress=False)
    merged = save_hf(L.merge_adapter(flat, cfg), arch, tmp_path / "merged", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    np.testing.assert_allclose(torch_logits(reloaded, TOKENS), ours, rtol=0, atol=TOL)
