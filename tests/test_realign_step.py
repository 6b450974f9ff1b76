"""The TRACE step on LoRA adapters: its first loss is the closed form at policy = reference, it moves
only the adapters (base bit-identical, optimizer state over adapters only), the loss falls, and the
step on 8 simulated devices (data x fsdp x tensor = 2 x 2 x 2) equals the one on 1 device."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from _pair_rows import random_pair_rows
from hf_tiny import numpy_model
from tracealign_jax import sharding
from tracealign_jax.config import LoRAConfig, MeshConfig, RealignConfig, TrainConfig
from tracealign_jax.model import ModelArch
from tracealign_jax.model import lora as L
from tracealign_jax.realign.step import init_lora_state, make_trace_lora_step
from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS

ARCH = ModelArch.from_hf_dict(dict(
    model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
))  # fmt: skip
CATS = np.array([RETAIN, INVERT, SUPPRESS, INVERT, RETAIN, SUPPRESS, INVERT, RETAIN], np.int32)
WEIGHTS = np.array([0.0, 1.5, 0.5, 1.25, 0.0, 0.25, 1.5, 0.0], np.float32)  # mean 1 over the 5 conflicts
RC = RealignConfig()
TC = TrainConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", max_grad_norm=1.0)


def host_batch(seed=0, length=24):
    rows = random_pair_rows(len(CATS), length, seed, vocab=128, prompt_len=(3, 8), response_len=(4, 12))
    return {**rows, "category": CATS, "weight": WEIGHTS}


def setup(mesh, dropout=0.0, tc=TC):
    model = L.add_lora(numpy_model(ARCH, seed=4), LoRAConfig(rank=4, alpha=8.0, dropout=dropout), seed=1)
    graphdef, adapter, base = L.split_adapter(model)
    rules = sharding.RULE_PRESETS["fsdp_tp"]
    fn, st_sh, b_sh, batch_sh = make_trace_lora_step(graphdef, adapter, base, mesh, rules, rc=RC, tc=tc,
                                                     dropout=dropout > 0)  # fmt: skip
    state = jax.device_put(init_lora_state(adapter, tc), st_sh)
    base = jax.device_put(base, b_sh)
    batch = {k: jax.device_put(jnp.asarray(v), batch_sh[k]) for k, v in host_batch().items()}
    return fn, state, base, batch


def run(mesh, steps, dropout=0.0, tc=TC):
    fn, state, base, batch = setup(mesh, dropout, tc)
    history = []
    for _ in range(steps):
        state, m = fn(state, base, batch)
        history.append({k: float(v) for k, v in m.items()})
    return state, base, history


def one_device():
    return sharding.build_mesh(MeshConfig(data=1), [jax.devices()[0]])


def test_first_loss_is_the_closed_form_and_only_adapters_move():
    mesh = one_device()
    fn, state, base, batch = setup(mesh)
    base_before = jax.tree.map(lambda x: np.asarray(x).copy(), base)
    adapter_before = jax.tree.map(lambda x: np.asarray(x).copy(), state.adapter)
    n_conf = int(np.sum(CATS != RETAIN))
    # policy = reference at B = 0: every log-ratio and the KL are 0, so each term is at its value at 0
    want = (WEIGHTS[CATS == INVERT].sum() * math.log(2) + WEIGHTS[CATS == SUPPRESS].sum() * 2 * math.log(2)) / n_conf
    history = []
    for _ in range(6):
        state, m = fn(state, base, batch)
        history.append({k: float(v) for k, v in m.items()})
    np.testing.assert_allclose(history[0]["loss/total"], want, rtol=1e-6)
    # KL(p || p) up to float32 round-off (policy and reference run through differently fused programs)
    assert abs(history[0]["loss/kl"]) < 1e-6 and history[-1]["loss/kl"] > 1e-4
    assert history[-1]["loss/total"] < history[0]["loss/total"]
    assert history[-1]["rewards/flipped_accuracy"] > 0.5
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)):
        assert np.asarray(b).tobytes() == a.tobytes()  # the frozen base is bit-identical
    assert all(not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(adapter_before), jax.tree.leaves(state.adapter)))  # fmt: skip
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.adapter)}
    assert all(x.shape in adapter_shapes or x.ndim == 0 for x in jax.tree.leaves(state.opt_state))


def test_eight_devices_equal_one_with_dropout():
    assert jax.device_count() == 8
    # Adam's update lr * m / (sqrt(v) + eps) turns float32 reduction-order noise in near-zero gradients
    # into O(lr) parameter differences (as in test_training_step). Here the adapters' first gradients are
    # tiny (A's is exactly 0 while B = 0), so eps sits above them: the update is then ~linear in the
    # gradient and the comparison is about the step, not about Adam's sign-like normalisation.
    tc = dataclasses.replace(TC, eps=1e-2)
    s1, _, h1 = run(one_device(), 2, 0.1, tc)
    mesh8 = sharding.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    s8, base8, h8 = run(mesh8, 2, 0.1, tc)
    assert base8["layers"]["wq"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert s8.adapter["lora"]["wq_b"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    for a, b in zip(h1, h8):
        for k in ("loss/total", "loss/invert", "loss/suppress", "loss/kl", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert float(jnp.abs(s1.adapter["lora"]["wq_b"].get_value()).max()) > 1e-3  # B left 0: the steps did something
    for a, b in zip(jax.tree.leaves(s1.adapter), jax.tree.leaves(s8.adapter)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
