"""LoRA through `training.loop.train`, for TRACE (`loss.type: trace`, triaged weighted pairs, metrics
per category) and plain DPO: adapter-only checkpoints (no base weight in them, checksums written);
an interrupted run resumes to the uninterrupted result bit for bit; the PEFT adapter directory is
written at the end; `export-hf` merges the adapters (its logits are the adapter forward's) and
writes the PEFT directory too."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from _training_toy import toy_config, write_toy_preferences
from tracealign_jax.records import RecordError
from tracealign_jax.training.loop import train

CATS = ["retain", "invert", "suppress", "invert"]


def _weighted(tmp_path, n=32):
    raw = write_toy_preferences(tmp_path / "raw.jsonl", n=n)
    rows = []
    for i, line in enumerate(raw.read_text().splitlines()):
        cat = CATS[i % 4]
        rows.append(dict(json.loads(line), category=cat, weight_mean1=0.0 if cat == "retain" else 0.5 + (i % 3) * 0.5))
    path = tmp_path / "weighted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(path, out, *extra):
    return toy_config(path, out, "loss.type=trace", "lora.rank=4", "lora.alpha=8", "train.steps=4",
                      "train.learning_rate=1e-2", "checkpoint.every_steps=2", *extra)  # fmt: skip


@pytest.mark.parametrize("loss", ["trace", "sigmoid"])
def test_lora_training_resumes_exactly_and_writes_the_peft_adapter(loss, tmp_path):
    path = _weighted(tmp_path)
    cfg = lambda out: _cfg(path, tmp_path / out, f"loss.type={loss}")  # noqa: E731
    full = train(cfg("full"), show_progress=False)
    assert full.steps_run == 4 and full.resumed_from is None
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    keys = ("loss/invert", "loss/suppress", "loss/kl", "weight/invert", "pairs/retain") if loss == "trace" else ()
    for key in (*keys, "loss/total", "grad_norm"):
        assert key in rows[0], key
    assert rows[-1]["loss/total"] < rows[0]["loss/total"]
    conf = json.loads((full.adapter_dir / "adapter_config.json").read_text())
    assert conf["r"] == 4 and (full.adapter_dir / "adapter_model.safetensors").is_file()

    part = train(cfg("split"), stop_after=2, show_progress=False)
    assert part.steps_run == 2 and part.adapter_dir is None
    rest = train(cfg("split"), show_progress=False)
    assert rest.resumed_from == 2 and rest.steps_run == 2
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(rest.state.params)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    ckpt_dir = tmp_path / "split" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.name.isdigit()) == ["2", "4"]
    assert sorted(p.name for p in (ckpt_dir / "checksums").iterdir()) == ["2.json", "4.json"]
    from tracealign_jax.training.checkpoint import open_checkpoints

    ckpt = open_checkpoints(ckpt_dir)
    saved = ckpt.manager.item_metadata(4)["state"]
    ckpt.close()
    assert set(saved["params"]) == {"lora"} and saved.get("frozen") is None and saved.get("ref_params") is None
    n_adapter = sum(x.size for x in jax.tree.leaves(rest.state.params))
    n_base = sum(x.size for x in jax.tree.leaves(rest.state.frozen))
    # bytes of the arrays the checkpoint declares, not of its files: the OCDBT files vary with how
    # orbax batched the async writes (0.14-0.16 MB on an idle machine, 0.60 MB in one loaded CI run)
    state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(saved))
    assert state_bytes < 4 * n_base  # adapter + Adam moments only: below one float32 copy of the base
    assert n_adapter < n_base / 4

    # export-hf merges the adapters into the base: the export's logits are the adapted model's
    from flax import nnx

    from tracealign_jax.cli import main
    from tracealign_jax.hf_io import load_hf

    assert main(["export-hf", "--checkpoint", str(tmp_path / "split"), "--out", str(tmp_path / "hf")]) == 0
    exported, _ = load_hf(tmp_path / "hf", progress=False)
    tok = np.asarray(np.random.default_rng(0).integers(0, 512, size=(2, 12)), np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
    fwd = jax.jit(lambda m: m(tok, pos)[0])
    adapter, base = jax.device_get(rest.state.params), jax.device_get(rest.state.frozen)
    want = np.asarray(fwd(nnx.merge(rest.graphdef, adapter, base)))
    no_adapter = np.asarray(fwd(nnx.merge(rest.graphdef, jax.tree.map(np.zeros_like, adapter), base)))
    assert np.abs(want - no_adapter).max() > 1e-3  # the trained adapters matter
    np.testing.assert_allclose(np.asarray(fwd(exported)), want, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "hf" / "peft_adapter" / "adapter_config.json").read_text())["r"] == 4


def test_trace_needs_lora_and_categories(tmp_path):
    from tracealign_jax.config import ConfigError

    path = _weighted(tmp_path, n=8)
    with pytest.raises(ConfigError, match="lora.rank"):
        train(_cfg(path, tmp_path / "a", "lora.rank=0"), show_progress=False)
    raw = write_toy_preferences(tmp_path / "raw2.jsonl", n=8)
    with pytest.raises(RecordError, match="category"):
        train(_cfg(raw, tmp_path / "b"), show_progress=False)
