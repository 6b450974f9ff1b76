"""`tracealign realign triage|impact`: JSONL in, JSONL + report out; labels cached; impact scores do
not depend on the impact batch size (padding pairs count nowhere)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from _training_toy import ROOT, write_toy_preferences
from test_realign_triage import POLICY, TABLE
from tracealign_jax.cli import main
from tracealign_jax.realign import judge as J
from tracealign_jax.realign.pipeline import run_triage


def _write_table(path):
    with open(path, "w") as f:
        for prompt, w, l_, _ in TABLE:
            f.write(json.dumps({"prompt": prompt, "chosen": w, "rejected": l_, "id": len(prompt)}) + "\n")
    return path


def test_triage_command_writes_categories_report_and_cache(tmp_path, capsys):
    (tmp_path / "policy.yaml").write_text(POLICY)
    pairs = _write_table(tmp_path / "pairs.jsonl")
    argv = ["realign", "triage", "--pairs", str(pairs), "--rules", str(tmp_path / "policy.yaml"), "--cache",
            str(tmp_path / "cache"), "--out", str(tmp_path / "triaged.jsonl"), "--report", str(tmp_path / "r.md")]
    assert main(argv) == 0
    assert "retain 2, invert 2, suppress 2" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "triaged.jsonl").read_text().splitlines()]
    assert [r["category"] for r in rows] == [t[3] for t in TABLE]
    assert rows[0]["id"] == len(TABLE[0][0]) and rows[2]["chosen_rule"] == "explosives" and rows[0]["judge"] == "rules"
    report = (tmp_path / "r.md").read_text()
    assert "retain: 2, invert: 2, suppress: 2" in report and "- dosage: 1" in report
    cache = (tmp_path / "cache" / "rules.jsonl").read_text()
    assert len(cache.splitlines()) == 12  # both responses of 6 pairs
    assert main(argv) == 0 and (tmp_path / "cache" / "rules.jsonl").read_text() == cache
    assert main(["realign", "triage", "--pairs", str(pairs), "--out", str(tmp_path / "x.jsonl")]) == 2  # no judge


def test_triage_with_two_judges_reports_agreement(tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    full = J.RulesJudge.from_yaml(tmp_path / "policy.yaml")
    explosives_only = J.RulesJudge("explosives only", full.categories[:1])
    explosives_only.name = "explosives_only"
    summary = run_triage(_write_table(tmp_path / "pairs.jsonl"), [full, explosives_only], tmp_path / "t.jsonl",
                         tmp_path / "r.md")  # fmt: skip
    row = summary["agreement"][0]
    # they differ exactly on the 3 refusals of dosage prompts (y_w of pair 3, both responses of pair 5):
    # the full policy flags them (newly allowed topic), the explosives-only policy does not
    assert (row["a"], row["b"], row["n"]) == ("rules", "explosives_only", 12)
    assert row["bad_ok"] == 3 and row["ok_bad"] == 0 and row["agree"] == 9 / 12
    assert "judge agreement" in (tmp_path / "r.md").read_text()


def test_impact_command_scores_and_weights(tmp_path, capsys):
    import jax
    from flax import nnx

    from tracealign_jax.config import load_config
    from tracealign_jax.realign import impact
    from tracealign_jax.realign.pipeline import _reference_model
    from tracealign_jax.pairs import load_pairs
    from tracealign_jax.training.data import build_batch

    raw = write_toy_preferences(tmp_path / "raw.jsonl", n=10)
    cats = ["retain", "invert", "suppress", "invert", "retain"] * 2
    recs = [dict(json.loads(x), category=c) for x, c in zip(raw.read_text().splitlines(), cats)]
    (tmp_path / "triaged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # on the 8 test devices: weights FSDP x tensor sharded, each batch of 4 pairs split over data x fsdp = 4
    sets = ["data.max_prompt_len=16", "data.max_response_len=16", "data.buckets=[32]", "realign.impact_batch_size=4",
            "mesh.fsdp=2", "mesh.tensor=2"]
    argv = ["realign", "impact", "--config", str(ROOT / "configs" / "tiny_cpu.yaml"), "--pairs", str(tmp_path / "triaged.jsonl"),
            "--out", str(tmp_path / "w.jsonl"), "--plot", str(tmp_path / "h.png")] + [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0
    assert "impact of 6 conflicting pairs (of 10)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(r["category"] == c for r, c in zip(rows, cats))
    w = np.array([r["weight"] for r in rows])
    conf = np.array([c != "retain" for c in cats])
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
    assert np.all(w[~conf] == 0) and np.all(np.array([r["impact_score"] for r in rows])[~conf] == 0)
    np.testing.assert_allclose([r["weight_mean1"] for r in rows], w * 6, rtol=1e-12)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    # one batch of 10 in file order (no padding, one device) gives the scores the CLI computed on the mesh in
    # batches of 4 (retained, inverted, suppressed pairs in turn; 2 padding pairs)
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", sets)
    pairs = load_pairs(dataclasses.replace(cfg.data, train_path=str(tmp_path / "triaged.jsonl")))
    host = build_batch(pairs, np.arange(10), 32)
    b = {k: jax.numpy.asarray(host[k]) for k in ("tokens", "positions", "valid", "loss_mask")}
    b["category"] = jax.numpy.asarray([{"retain": 0, "invert": 1, "suppress": 2}[c] for c in cats], jax.numpy.int32)
    graphdef, params = nnx.split(_reference_model(cfg, None, None))
    want = impact.impact_scores(graphdef, params, [b], beta=cfg.realign.beta)
    np.testing.assert_allclose([r["impact_score"] for r in rows], want, rtol=1e-4, atol=1e-9)
