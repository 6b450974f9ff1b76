"""Two real processes (gloo, 4 simulated devices each) == one process with 8 devices, for the host-side
precomputes split over processes (per-token BCI, veto table), for ``save_hf`` of a model whose weights
are sharded across both processes, and for the reference log-prob precompute run by both processes'
devices on that model, and for TRACE impact scores on it: every process gets back the single-process
results, each scored only its share, and the exported safetensors are byte-identical."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from provenance_corpus import build

WORKER = Path(__file__).resolve().parent / "_multihost_worker.py"


def _run(index_dir: Path, out: Path, devices: int, *dist: str) -> subprocess.Popen:
    out.mkdir(exist_ok=True)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(WORKER), str(index_dir), str(out), *dist], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _finish(proc: subprocess.Popen) -> None:
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]


@pytest.mark.slow
def test_two_processes_precompute_and_export_what_one_does(tmp_path):
    index_dir = build(tmp_path)[2].path
    rng = np.random.default_rng(0)  # 12 pairs of token ids for the reference precompute (shared by all runs)
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps({f"{k}_ids": rng.integers(3, 64, int(rng.integers(2, 12))).tolist()
                                                              for k in ("prompt", "chosen", "rejected")}) + "\n" for _ in range(12)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_run(index_dir, tmp_path / "multi", 4, f"127.0.0.1:{port}", "2", str(i)) for i in range(2)]
    single = _run(index_dir, tmp_path / "single", 8)
    for p in (*procs, single):
        _finish(p)
    want = np.load(tmp_path / "single" / "p0.npz")
    assert any(k.startswith("bci_") and want[k].any() for k in want.files)  # some response token is high-BCI
    assert want["veto_penalties"].size > 0
    for i in range(2):
        got = np.load(tmp_path / "multi" / f"p{i}.npz")
        assert sorted(got.files) == sorted(want.files)
        for k in want.files:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (i, k)
    want_ref = np.load(tmp_path / "single" / "ref0.npz")
    assert len(want_ref.files) == 24 and all(want_ref[k].size and np.all(want_ref[k] < 0) for k in want_ref.files)
    for i in range(2):
        got = np.load(tmp_path / "multi" / f"ref{i}.npz")
        for k in want_ref.files:
            np.testing.assert_allclose(got[k], want_ref[k], rtol=0, atol=1e-6, err_msg=f"process {i} {k}")
    want_impact = np.load(tmp_path / "single" / "impact0.npy")
    assert want_impact.shape == (12,) and np.all(want_impact[0::3] == 0) and np.all(want_impact[1::3] != 0)
    for i in range(2):  # weights sharded across the two processes: the scores of one process
        np.testing.assert_allclose(np.load(tmp_path / "multi" / f"impact{i}.npy"), want_impact, rtol=1e-5,
                                   atol=1e-6 * np.abs(want_impact).max(), err_msg=f"process {i} impact")  # fmt: skip
    # Each process scored its share, and together exactly what one process scored.
    one = json.loads((tmp_path / "single" / "p0.json").read_text())
    two = [json.loads((tmp_path / "multi" / f"p{i}.json").read_text()) for i in range(2)]
    for key in ("scan_batch", "score_spans", "score_arrays"):
        assert two[0][key] + two[1][key] == one[key] and 0 < two[0][key] < one[key], key
    files = sorted(p.name for p in (tmp_path / "single" / "hf").iterdir())
    assert "model.safetensors.index.json" in files
    assert files == sorted(p.name for p in (tmp_path / "multi" / "hf").iterdir())
    for name in files:
        if name.endswith((".safetensors", ".json")) and name != "manifest.json":
            assert (tmp_path / "multi" / "hf" / name).read_bytes() == (tmp_path / "single" / "hf" / name).read_bytes(), name
