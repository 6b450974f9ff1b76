"""LoRA through the one training step (``training.step``): the first TRACE loss is the closed form at
policy = reference, only the adapters move (base bit-identical, optimizer state over adapters only),
the loss falls; for TRACE, DPO + CBD (data term) and SFT the step on 8 simulated devices (data x
fsdp x tensor = 2 x 2 x 2) equals the one on 1 device, with adapter dropout on."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _pair_rows import random_pair_rows
from _training_toy import ROOT
from hf_tiny import numpy_model
from tracealign_jax import sharding
from tracealign_jax.config import MeshConfig, load_config
from tracealign_jax.model import ModelArch
from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS
from tracealign_jax.training.loop import to_device_batch
from tracealign_jax.training.state import graphdef_and_abstract_params, init_train_state, state_shardings
from tracealign_jax.training.step import PAIR_FIELDS, batch_fields, batch_rows, batch_shardings, make_train_step

ARCH_DICT = dict(
    model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
)  # fmt: skip
ARCH = ModelArch.from_hf_dict(ARCH_DICT)
CATS = np.array([RETAIN, INVERT, SUPPRESS, INVERT, RETAIN, SUPPRESS, INVERT, RETAIN], np.int32)
WEIGHTS = np.array([0.0, 1.5, 0.5, 1.25, 0.0, 0.25, 1.5, 0.0], np.float32)  # mean 1 over the 5 conflicts


def config(loss: str, *extra: str, dropout: float = 0.0, eps: float = 1e-8):
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", [
        f"model.arch={json.dumps(ARCH_DICT)}", f"loss.type={loss}", "lora.rank=4", "lora.alpha=8",
        f"lora.dropout={dropout}", "train.batch_size=8", "train.learning_rate=1e-2", "train.warmup_steps=0",
        "train.schedule=constant", "train.max_grad_norm=1.0", f"train.eps={eps}", "mesh.rules=fsdp_tp", *extra,
    ])  # fmt: skip


def host_batch(cfg, seed=0, length=24):
    rows = random_pair_rows(len(CATS), length, seed, vocab=128, prompt_len=(3, 8), response_len=(4, 12))
    rng = np.random.default_rng(seed + 1)  # high BCI on ~20% of response tokens (CBD term a)
    bci = np.where(rng.random(rows["loss_mask"].shape) < 0.2, rng.uniform(2, 10, rows["loss_mask"].shape), 0)
    extra = {"category": CATS, "weight": WEIGHTS, "bci": (bci * rows["loss_mask"]).astype(np.float32)}
    n = batch_rows(cfg)  # SFT: one row per example
    return {k: v if k in PAIR_FIELDS else v[:n] for k, v in {**rows, **extra}.items() if k in batch_fields(cfg)}


def setup(cfg, mesh):
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, state = init_train_state(cfg, mesh, rules, model=numpy_model(ARCH, seed=4))
    abs_params = graphdef_and_abstract_params(cfg, mesh, rules)[1]
    fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    return fn, state, to_device_batch(host_batch(cfg), batch_shardings(cfg, mesh, rules))


def run(cfg, mesh, steps):
    fn, state, batch = setup(cfg, mesh)
    base_before = jax.tree.map(lambda x: np.asarray(x).copy(), state.frozen)  # the state is donated
    adapter_before = jax.tree.map(lambda x: np.asarray(x).copy(), state.params)
    history = []
    for _ in range(steps):
        state, m = fn(state, batch, None)
        history.append({k: float(v) for k, v in m.items()})
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(state.frozen)):
        assert np.asarray(b).tobytes() == a.tobytes()  # the frozen base is bit-identical
    assert all(not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(adapter_before), jax.tree.leaves(state.params)))  # fmt: skip
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    assert all(x.shape in adapter_shapes or x.ndim == 0 for x in jax.tree.leaves(state.opt_state))
    assert state.ref_params is None  # the reference is the base: no copy
    return state, history


def one_device():
    return sharding.build_mesh(MeshConfig(data=1), [jax.devices()[0]])


def test_first_trace_loss_is_the_closed_form_and_only_adapters_move():
    n_conf = int(np.sum(CATS != RETAIN))
    # policy = reference at B = 0: every log-ratio and the KL are 0, so each term is at its value at 0
    want = (WEIGHTS[CATS == INVERT].sum() * math.log(2) + WEIGHTS[CATS == SUPPRESS].sum() * 2 * math.log(2)) / n_conf
    _, history = run(config("trace"), one_device(), 6)
    np.testing.assert_allclose(history[0]["loss/total"], want, rtol=1e-6)
    # KL(p || p) up to float32 round-off (policy and reference run through differently fused programs)
    assert abs(history[0]["loss/kl"]) < 1e-6 and history[-1]["loss/kl"] > 1e-4
    assert history[-1]["loss/total"] < history[0]["loss/total"]
    assert history[-1]["rewards/flipped_accuracy"] > 0.5


def test_trace_step_runs_the_configured_attention_kernel(monkeypatch):
    """``model.attention`` reaches both TRACE forwards (it was ignored: always einsum) and the fused XLA
    kernel gives the einsum path's losses."""
    from tracealign_jax.model import attention

    seen, real = [], attention.resolve
    monkeypatch.setattr(attention, "resolve", lambda impl: seen.append(impl) or real(impl))
    _, fused = run(config("trace", "model.attention=xla"), one_device(), 2)
    assert seen and set(seen) == {"xla"}
    _, reference = run(config("trace"), one_device(), 2)
    for a, b in zip(reference, fused):
        for k in ("loss/total", "loss/kl", "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-7, err_msg=k)


OBJECTIVES = {"trace": ("trace",), "dpo+cbd": ("sigmoid", "loss.cbd_data_weight=0.5", "loss.cbd_bci_scale=5", "data.pair_layout=separate"),
              "sft": ("sigmoid", "train.objective=sft")}  # fmt: skip


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_eight_devices_equal_one_with_dropout(objective):
    assert jax.device_count() == 8
    # Adam's update lr * m / (sqrt(v) + eps) turns float32 reduction-order noise in near-zero gradients
    # into O(lr) parameter differences (as in test_training_step). Here the adapters' first gradients are
    # tiny (A's is exactly 0 while B = 0), so eps sits above them: the update is then ~linear in the
    # gradient and the comparison is about the step, not about Adam's sign-like normalisation.
    cfg = config(*OBJECTIVES[objective], dropout=0.1, eps=1e-2)
    s1, h1 = run(cfg, one_device(), 2)
    s8, h8 = run(cfg, sharding.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), 2)
    assert s8.frozen["layers"]["wq"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert s8.params["lora"]["wq_b"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    keys = {"trace": ("loss/total", "loss/invert", "loss/suppress", "loss/kl"), "dpo+cbd": ("loss/total", "loss/cbd_data"),
            "sft": ("loss/total",)}[objective]  # fmt: skip
    for a, b in zip(h1, h8):
        for k in (*keys, "grad_norm"):
            np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert float(jnp.abs(s1.params["lora"]["wq_b"].get_value()).max()) > 1e-3  # B left 0: the steps did something
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
