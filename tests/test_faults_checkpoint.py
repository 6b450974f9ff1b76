"""Faults in checkpoints and exports (issue 17 items 3, 6, 12, disk full): a flipped or truncated byte in
any checkpoint file is refused at restore / export naming the file; a resumed run logs every step once
(metrics.jsonl and TensorBoard); export rebuilds the architecture the checkpoint was trained with; a
write that hits a full disk leaves no partial file."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from _training_toy import toy_config, write_toy_preferences
from tracealign_jax import cli
from tracealign_jax.atomic_io import IntegrityError, atomic_write_json

STEPS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A toy SFT run killed (stop_after) after step 3 with a checkpoint at step 2, then resumed to step 4."""
    from tracealign_jax.training.loop import train

    d = tmp_path_factory.mktemp("ckpt")
    data = write_toy_preferences(d / "prefs.jsonl", n=16)
    cfg = toy_config(data, d / "run", f"train.steps={STEPS}", "checkpoint.every_steps=2", "train.batch_size=8",
                     "train.objective=sft")
    first = train(cfg, stop_after=3, show_progress=False)
    assert first.steps_run == 3
    second = train(cfg, show_progress=False)
    assert second.resumed_from == 2 and second.steps_run == 2
    return d / "run", cfg


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["checkpoint"]["dir"] = ""
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


def _tb_scalars(tb_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of the scalar events TensorBoard shows: files in write order, a SessionLog START at
    step s purging earlier events with step >= s (TensorBoard's restart rule)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    seen: list[tuple[str, int]] = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            ev = Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                seen = [(t, s) for t, s in seen if s < ev.step]
            for v in ev.summary.value:
                seen.append((v.tag, ev.step))
    return seen


def test_resume_logs_every_step_once(run):
    run_dir, _ = run
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))
    tb = _tb_scalars(run_dir / "tb")
    losses = sorted(s for t, s in tb if t == "loss/total")
    assert losses == list(range(1, STEPS + 1)), losses
    assert len(tb) == len(set(tb))


def _step_files(run_dir: Path, step: int = STEPS) -> list[Path]:
    return sorted(p for p in (run_dir / "checkpoints" / str(step)).rglob("*") if p.is_file())


def _restore(run_dir: Path, cfg):
    import jax

    from tracealign_jax import sharding
    from tracealign_jax.config import MeshConfig
    from tracealign_jax.training.checkpoint import restore_params
    from tracealign_jax.training.state import abstract_train_state

    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    return restore_params(run_dir / "checkpoints", abstract_train_state(cfg, mesh, sharding.resolve_rules(cfg.mesh.rules)))


def test_a_flipped_byte_in_any_checkpoint_file_is_refused(run, tmp_path, capsys):
    run_dir, cfg = run
    rng = np.random.default_rng(0)
    files = _step_files(run_dir)
    assert len(files) >= 4
    biggest = max(files, key=lambda p: p.stat().st_size)
    for victim in [biggest, *rng.choice(files, size=3, replace=False)]:
        dest = _copy(run_dir, tmp_path / victim.name / str(rng.integers(1 << 30)))
        target = dest / victim.relative_to(run_dir)
        raw = bytearray(target.read_bytes())
        raw[int(rng.integers(len(raw)))] ^= 0x10
        target.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError, match=str(target).replace(".", r"\.")):
            _restore(dest, cfg)
        assert cli.main(["export-hf", "--checkpoint", str(dest), "--out", str(dest / "hf")]) == 2
        assert str(target) in capsys.readouterr().err and not (dest / "hf").exists()


def test_truncation_at_random_offsets_and_a_truncated_metadata_are_named(run, tmp_path):
    run_dir, cfg = run
    rng = np.random.default_rng(1)
    files = _step_files(run_dir)
    meta = [p for p in files if p.name == "_METADATA"]
    assert meta
    for i, victim in enumerate([meta[0], *rng.choice(files, size=3, replace=False)]):
        dest = _copy(run_dir, tmp_path / str(i))
        target = dest / victim.relative_to(run_dir)
        raw = target.read_bytes()
        target.write_bytes(raw[: int(rng.integers(len(raw)))])
        with pytest.raises(IntegrityError, match=f"{target}: .* bytes on disk"):
            _restore(dest, cfg)
    # without its checksum record (saved by older code), a truncated _METADATA still names the checkpoint
    dest = _copy(run_dir, tmp_path / "nosum")
    (dest / "checkpoints" / "checksums" / f"{STEPS}.json").unlink()
    target = dest / meta[0].relative_to(run_dir)
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(IntegrityError, match=f"{dest / 'checkpoints' / str(STEPS)}: unreadable checkpoint"):
        _restore(dest, cfg)


def test_export_uses_the_architecture_the_checkpoint_was_trained_with(run, tmp_path):
    run_dir, _ = run
    dest = _copy(run_dir, tmp_path)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    trained_eps = cfg["model"]["arch"]["rms_norm_eps"]
    cfg["model"]["arch"].update(rms_norm_eps=trained_eps * 10, vocab_size=640)  # the YAML changed since training
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["export-hf", "--checkpoint", str(dest), "--out", str(dest / "hf")]) == 0
    exported = json.loads((dest / "hf" / "config.json").read_text())
    assert exported["rms_norm_eps"] == trained_eps and exported["vocab_size"] == 512


def test_resume_with_another_architecture_is_refused(run):
    from tracealign_jax.training.loop import train

    run_dir, cfg = run
    other = toy_config(Path(cfg.data.train_path), run_dir, f"train.steps={STEPS + 1}", "checkpoint.every_steps=2",
                       "train.batch_size=8", "train.objective=sft", "model.arch.rms_norm_eps=1.0e-6")  # fmt: skip
    with pytest.raises(IntegrityError, match=r"model_config\.json: these checkpoints were trained with another "
                                             r"architecture \(rms_norm_eps: 1e-05 vs now 1e-06\)"):
        train(other, show_progress=False)


def test_a_flipped_byte_in_an_export_is_refused_on_load(run, tmp_path):
    from tracealign_jax.hf_io import load_hf

    run_dir, _ = run
    dest = _copy(run_dir, tmp_path)
    out = dest / "hf"
    assert cli.main(["export-hf", "--checkpoint", str(dest), "--out", str(out)]) == 0
    load_hf(out, progress=False)
    weights = out / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=f"{weights}: SHA-256 differs"):
        load_hf(out, progress=False)


def test_disk_full_during_export_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    from tracealign_jax.hf_io import save

    run_dir, _ = run
    dest = _copy(run_dir, tmp_path)
    real = save.write_safetensors

    def full_disk(path, plans, metadata):
        real(path, plans[:1], metadata)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(save, "write_safetensors", full_disk)
    assert cli.main(["export-hf", "--checkpoint", str(dest), "--out", str(dest / "hf")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in run_dir.iterdir())


def test_disk_full_during_an_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import os

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    atomic_write_json(tmp_path / "threshold.json", {"tau": 1.0})
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(tmp_path / "threshold.json", {"tau": 2.0})
    assert [p.name for p in tmp_path.iterdir()] == ["threshold.json"]
    assert json.loads((tmp_path / "threshold.json").read_text()) == {"tau": 1.0}
