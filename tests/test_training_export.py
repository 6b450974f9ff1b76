"""SFT through the CLI, export-hf, reload with transformers (logits match); precomputed reference
log-probs stored with tensorstore equal the in-step reference and are keyed by reference + dataset."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _training_toy import ROOT, toy_config, write_toy_preferences
from tracealign_jax import cli, sharding
from tracealign_jax.config import MeshConfig
from tracealign_jax.model import param_shardings
from tracealign_jax.pairs import load_pairs
from tracealign_jax.training import reference
from tracealign_jax.training.data import build_batch
from tracealign_jax.training.state import init_train_state
from tracealign_jax.training.step import _forward_logps


def test_sft_cli_then_export_hf_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    data = write_toy_preferences(tmp_path / "prefs.jsonl", n=16)
    run = tmp_path / "sft"
    sets = [f"data.train_path={data}", f"train.output_dir={run}", "train.objective=sft", "train.steps=3",
            "data.buckets=[32]", "data.max_prompt_len=16", "data.max_response_len=16", "mesh.data=8",
            "checkpoint.async_save=false"]  # fmt: skip
    argv = ["train", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--no-progress"]
    assert cli.main(argv + sum((["--set", s] for s in sets), [])) == 0
    assert (run / "checkpoints" / "3").is_dir() and (run / "metrics.jsonl").is_file()
    out = tmp_path / "hf"
    assert cli.main(["export-hf", "--checkpoint", str(run), "--out", str(out)]) == 0

    from tracealign_jax.training.checkpoint import restore_params
    from tracealign_jax.training.export import resolve_run
    from tracealign_jax.config import load_config
    from tracealign_jax.training.state import abstract_train_state, graphdef_and_abstract_params

    cfg = load_config(resolve_run(run, None)[1])
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, _ = graphdef_and_abstract_params(cfg, mesh, rules)
    model = nnx.merge(graphdef, restore_params(run / "checkpoints", abstract_train_state(cfg, mesh, rules)))
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 12)).astype(np.int32)
    ours, _ = model(jnp.asarray(tokens), jnp.asarray(np.tile(np.arange(12, dtype=np.int32), (2, 1))))
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


def test_precomputed_reference_matches_in_step_and_is_keyed(tmp_path):
    data = write_toy_preferences(tmp_path / "prefs.jsonl", n=12)
    cfg = toy_config(data, tmp_path / "r", "loss.reference=precomputed", f"data.ref_logps_path={tmp_path / 'refs'}")
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, state = init_train_state(cfg, mesh, rules)
    pairs = load_pairs(cfg.data)
    assert reference.open_reference(cfg, pairs) is None
    reader = reference.precompute_reference(cfg, graphdef, state.params, pairs, mesh, rules, batch_size=8)
    again = reference.open_reference(cfg, pairs)  # a later run finds the same store
    assert again is not None and again.meta["key"] == reader.meta["key"]
    idx = np.array([3, 7, 0, 11])
    b = build_batch(pairs, idx, 32, ref_logps=again)
    direct = jax.jit(lambda p, x: _forward_logps(graphdef, p, x, 0, None)[0])(
        state.params, {k: jnp.asarray(b[k]) for k in ("tokens", "positions", "valid")})
    want = np.asarray(direct) * b["loss_mask"]
    np.testing.assert_allclose(b["ref_logps"], want, rtol=1e-5, atol=1e-5)
    assert (b["ref_logps"][b["loss_mask"] > 0] < 0).all()
    other_seed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1))
    assert reference.open_reference(other_seed, pairs) is None  # another reference model: not reused
    # The same reference on an 8-device mesh (rows over data x fsdp, weights over fsdp x tensor).
    mesh8 = sharding.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
    params8 = jax.device_put(state.params, param_shardings(state.params, mesh8, rules))
    cfg8 = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, ref_logps_path=str(tmp_path / "refs8")))
    on8 = reference.precompute_reference(cfg8, graphdef, params8, pairs, mesh8, rules, batch_size=8)
    for side8, side1 in zip(on8.read(idx), reader.read(idx)):
        for x, y in zip(side8, side1):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
