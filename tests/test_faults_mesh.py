"""Mesh vs model (issue 17 item 8): a mesh axis that does not divide a parameter dimension (mesh.tensor
larger than the KV heads, as tensor=16 over Llama-3-8B's 8 KV heads) is refused naming the mesh setting,
the dimension and the parameter, not with jax's bare IndivisibleError."""

from __future__ import annotations

import jax
import pytest

from tracealign_jax import sharding
from tracealign_jax.config import ConfigError, MeshConfig
from tracealign_jax.model import ModelArch, abstract_model

ARCH = ModelArch.from_hf_dict(dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2))  # fmt: skip


def test_tensor_axis_larger_than_kv_heads_is_refused_with_the_reason():
    mesh = sharding.build_mesh(MeshConfig(data=1, fsdp=2, tensor=4), jax.devices()[:8])
    with pytest.raises(ConfigError, match=r"mesh\.tensor=4: does not divide the 'kv_heads' dimension \(2\) of parameter "
                                          r"layers/wk .*; choose a mesh whose tensor size divides 2"):
        abstract_model(ARCH, mesh=mesh, rules=sharding.resolve_rules("fsdp_tp"))


def test_a_dividing_mesh_is_accepted():
    mesh = sharding.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    _, state = abstract_model(ARCH, mesh=mesh, rules=sharding.resolve_rules("fsdp_tp"))
    assert jax.tree.leaves(state)


def test_a_batch_the_data_axes_do_not_divide_is_refused_before_compiling(tmp_path):
    from _training_toy import toy_config, write_toy_preferences

    from tracealign_jax.training.loop import train

    data = write_toy_preferences(tmp_path / "prefs.jsonl", n=16)
    cfg = toy_config(data, tmp_path / "run", "train.objective=sft", "train.batch_size=4")  # 4 rows over 8 devices
    with pytest.raises(ConfigError, match=r"train\.batch_size=4 \(4 rows, 1 row per example\) is "
                                          r"not divisible over the batch axes mesh\.data=8 x mesh\.fsdp=1"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()
