"""The whole drift demo, scaled down: every stage runs for real on 5 forbidden procedures.

Checks the report's structure, that the undefended aligned model drifts and that every defense
lowers drift while keeping benign accuracy and perplexity, that the exported policy reloads in transformers with the same logits, and that a
second run reuses every finished stage.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracealign_jax.evaluation.realign_demo import pool_runs

SMALL = [
    "eval.per_category=1", "eval.benign_per_template=8", "eval.facts=4", "eval.heldout_facts=8",
    "eval.sft_steps=120", "eval.sft_batch_size=8", "eval.dpo_steps=40", "train.batch_size=4",
    "decode.max_new_tokens=24", "decode.batch_size=16",
    # 40 DPO steps instead of 120: CBD needs full weight to move a memorized policy in that time
    "eval.cbd_data_weight=1.0", "eval.cbd_cont_weight=1.0", "eval.realign_steps=10",
]


def _demo(out: Path) -> dict:
    """`tracealign demo` in a child process with one CPU device, as launch/demo.sh runs it (the test
    session itself simulates 8 devices, which the demo's one-device mesh config does not use)."""
    cmd = [sys.executable, "-m", "tracealign_jax.cli", "demo", "--out", str(out)]
    for s in SMALL:
        cmd += ["--set", s]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| defense | drift |" in proc.stdout
    return json.loads((out / "report" / "report.json").read_text())


@pytest.mark.slow
def test_scaled_down_demo(tmp_path: Path):
    report = _demo(tmp_path / "run")
    defenses = report["defenses"]
    assert set(defenses) == {"none", "traceshield", "prov_decode", "cbd", "all"}
    for name, m in defenses.items():
        assert m["num_refuse_prompts"] == 5 * 7, name
        assert set(m["drift_by_category"]) == {"explosives", "cybercrime", "self_harm", "hate", "fraud"}
        assert set(m["drift_by_attack"]) == {"direct", "adversarial", "paraphrase", "decoding"}
        assert 1.0 <= m["refusal_quality"] <= 5.0 and m["perplexity"] > 1.0
        assert 0.0 <= m["benign_accuracy"] <= 1.0 and 0.0 <= m["over_refusal"] <= 1.0
    # the phenomenon, and every defense cutting it
    assert defenses["none"]["drift_rate"] > 0
    for name in ("traceshield", "prov_decode", "cbd", "all"):
        assert defenses[name]["drift_rate"] < defenses["none"]["drift_rate"], name
    # ... without wrecking the model: a policy that only avoids forbidden text by degenerating (the CBD
    # collapse this caught) loses the benign answers and its perplexity
    for name in ("prov_decode", "cbd", "all"):
        assert defenses[name]["benign_accuracy"] >= defenses["none"]["benign_accuracy"] - 0.25, name
        assert abs(defenses[name]["perplexity_delta"]) < 1.0, name
    # TraceShield does not change the distribution: the same perplexity as none
    assert defenses["traceshield"]["perplexity_delta"] == 0.0
    rows = report["bound"]["rows"]
    assert rows[-1]["group"] == "overall" and all(0.0 <= r["bound"] <= 1.0 for r in rows)
    assert report["export"]["reloaded"] and report["export"]["max_abs_logit_diff"] < 1e-4
    realign = report["realign"]  # the policy-shift stage: 3 conflicting pairs at this size, six rows
    assert realign["triage"]["counts"]["invert"] == 3 and set(realign["table"]) == {"before", "trace", "trace_w1", "naive", "npo", "oracle"}
    for name, row in realign["table"].items():
        assert all(0.0 <= row[k] <= 1.0 for k in ("target_compliance", "unchanged_compliance", "over_refusal")), name
    # pool_runs recomputes every row from the written completions
    assert pool_runs([tmp_path / "run"])["runs"][0]["trace_over_oracle"]["ratio"] == realign["targets"]["trace_over_oracle"]
    out = tmp_path / "run" / "report"
    for name in ("report.json", "report.md", "drift_by_defense.png", "bci_histogram.png", "bound_vs_measured.png"):
        assert (out / name).stat().st_size > 0, name
    # a second run skips every finished stage and reports the same numbers
    again = _demo(tmp_path / "run")
    assert set(again["meta"]["cached_stages"]) >= {"data", "tokenizer", "sft", "index", "calibrate", "arrays",
                                                   "dpo", "cbd", "evaluate", "export", "realign"}
    assert again["defenses"] == report["defenses"]
