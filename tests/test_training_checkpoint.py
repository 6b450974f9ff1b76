"""Kill -9 mid-training then resume == uninterrupted (bit for bit); restore onto a 4-device mesh;
two real processes (gloo, 4 devices each) == one process with 8 devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from _training_toy import toy_config, write_toy_preferences
from tracealign_jax import sharding
from tracealign_jax.config import MeshConfig
from tracealign_jax.training.checkpoint import Checkpointer
from tracealign_jax.training.loop import train
from tracealign_jax.training.state import abstract_train_state

WORKER = Path(__file__).resolve().parent / "_training_worker.py"
MESH = ("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2")


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _worker(data, out, hist, *overrides, delay=0.0, devices=8):
    cmd = [sys.executable, str(WORKER), str(data), str(out), str(hist), *sum((["--set", o] for o in overrides), [])]
    if delay:
        cmd += ["--delay", str(delay)]
    return subprocess.Popen(cmd, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]


def _restore(cfg, ckpt_dir, mesh_cfg, devices, step=None):
    mesh = sharding.build_mesh(mesh_cfg, devices)
    rules = sharding.resolve_rules(cfg.mesh.rules)
    ckpt = Checkpointer(cfg.checkpoint, ckpt_dir)
    try:
        return ckpt.restore(abstract_train_state(cfg, mesh, rules), step)
    finally:
        ckpt.close()


@pytest.mark.slow
def test_sigkill_resume_matches_uninterrupted_and_restores_on_4_devices(tmp_path):
    data = write_toy_preferences(tmp_path / "prefs.jsonl")
    common = (*MESH, "train.steps=6")
    straight = _worker(data, tmp_path / "straight", tmp_path / "h0.json", *common)
    killed = _worker(data, tmp_path / "killed", tmp_path / "h1.json", *common, "checkpoint.every_steps=1", delay=1.0)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpts / "3").is_dir():
        assert killed.poll() is None, killed.communicate()[0][-4000:]
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    steps_at_kill = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert 3 <= max(steps_at_kill) < 6
    resumed = _worker(data, tmp_path / "killed", tmp_path / "h2.json", *common, "checkpoint.every_steps=1")
    _finish(straight)
    _finish(resumed)
    info = json.loads((tmp_path / "h2.json").read_text())
    assert info["resumed_from"] == max(steps_at_kill) and len(info["history"]) == 6 - max(steps_at_kill)

    cfg = toy_config(data, tmp_path / "x", *common)
    full = MeshConfig(data=1, fsdp=4, tensor=2)
    s_a, pos_a = _restore(cfg, tmp_path / "straight" / "checkpoints", full, jax.devices(), 6)
    s_b, pos_b = _restore(cfg, ckpts, full, jax.devices(), 6)
    assert pos_a == pos_b and int(s_a.step) == int(s_b.step) == 6
    for x, y in zip(jax.tree.leaves((s_a.params, s_a.opt_state)), jax.tree.leaves((s_b.params, s_b.opt_state))):
        assert np.array_equal(np.asarray(x), np.asarray(y))  # bit for bit: same data order, same math

    s_4, _ = _restore(cfg, ckpts, MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4], 6)
    leaf = jax.tree.leaves(s_4.params)[0]
    assert len(leaf.sharding.device_set) == 4 and leaf.sharding.mesh.shape["fsdp"] == 2
    for x, y in zip(jax.tree.leaves(s_4.params), jax.tree.leaves(s_b.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    data = write_toy_preferences(tmp_path / "prefs.jsonl")
    common = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=4")
    port = _free_port()
    procs = [
        _worker(data, tmp_path / "multi", tmp_path / f"p{i}.json", *common, f"mesh.coordinator=127.0.0.1:{port}",
                "mesh.num_processes=2", f"mesh.process_id={i}", devices=4)  # fmt: skip
        for i in range(2)
    ]
    single = train(toy_config(data, tmp_path / "single", *common), show_progress=False).history
    for p in procs:
        _finish(p)
    for i in range(2):
        multi = json.loads((tmp_path / f"p{i}.json").read_text())["history"]
        assert [h["step"] for h in multi] == [h["step"] for h in single]
        for a, b in zip(multi, single):
            for k in ("loss/total", "rewards/margins", "grad_norm"):
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"process {i} step {a['step']} {k}")
    assert (tmp_path / "multi" / "checkpoints" / "4").is_dir()  # the final save worked across processes


def test_checkpoint_from_before_the_veto_left_the_state_restores(tmp_path):
    """Checkpoints written while TrainState still had an ``rng`` key (and a never-saved ``veto``) restore:
    the extra item is ignored, every other item comes back as saved."""
    import jax.numpy as jnp
    from flax import struct

    from tracealign_jax.training.state import init_train_state

    class OldTrainState(struct.PyTreeNode):  # the field layout of checkpoints written before issue 19
        step: jax.Array
        params: object
        opt_state: object
        rng: jax.Array
        ref_params: object
        nonfinite_in_row: jax.Array
        nonfinite_total: jax.Array
        veto: object = None

    cfg = toy_config(write_toy_preferences(tmp_path / "prefs.jsonl"), tmp_path / "run")
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    _, state = init_train_state(cfg, mesh, rules)
    old = OldTrainState(step=state.step + 7, params=state.params, opt_state=state.opt_state,
                        rng=jax.random.key_data(jax.random.key(0)), ref_params=state.ref_params,
                        nonfinite_in_row=state.nonfinite_in_row, nonfinite_total=state.nonfinite_total + 2)  # fmt: skip
    ckpt = Checkpointer(cfg.checkpoint, tmp_path / "ckpt")
    ckpt.save(7, old, {"epoch": 0, "cursor": 7, "num_examples": 32})
    ckpt.close()
    got, pos = _restore(cfg, tmp_path / "ckpt", MeshConfig(data=1), jax.devices()[:1])
    assert pos == {"epoch": 0, "cursor": 7, "num_examples": 32}
    assert int(got.step) == 7 and int(got.nonfinite_total) == 2
    for x, y in zip(jax.tree.leaves((got.params, got.opt_state, got.ref_params)),
                    jax.tree.leaves((state.params, state.opt_state, state.ref_params))):  # fmt: skip
        assert np.array_equal(np.asarray(x), np.asarray(y)) and jnp.asarray(x).dtype == jnp.asarray(y).dtype
