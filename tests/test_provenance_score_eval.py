"""The span score on generated worlds it was not tuned on: the default ``evidence`` BCI refuses text
memorized from violating documents and passes rare benign text, boilerplate and paraphrases; the
paper's raw rarity shows the weakness it has (rare benign text refused).

Seeds 1, 2, 3 and 5 were the development seeds; 11 and 12 are used only here.
"""

from __future__ import annotations

import json

import pytest

from tracealign_jax.cli import main
from tracealign_jax.evaluation.span_corpus import KINDS, SpanCorpusSizes, generate_span_corpus

SEEDS = (11, 12)


@pytest.fixture(scope="module", params=SEEDS)
def results(request, tmp_path_factory):
    work = tmp_path_factory.mktemp(f"world{request.param}")
    assert main(["bci", "evaluate", "--synthetic", str(request.param), "--work", str(work),
                 "--out", str(work / "results.json")]) == 0
    return work, json.loads((work / "results.json").read_text())


def test_evidence_mode_meets_the_targets(results):
    _, res = results
    ev = res["evidence"]
    assert ev["precision"] >= 0.95 and ev["recall"] >= 0.95, ev
    assert ev["kinds"]["rare_benign"]["rate"] <= 0.05
    assert all(ev["kinds"][k]["rate"] >= 0.95 for k, label in KINDS.items() if label == "refuse")
    assert ev["prior"]["source"] == "empirical"


def test_rarity_and_the_fixed_prior_refuse_rare_benign_text(results):
    _, res = results
    assert res["rarity"]["kinds"]["rare_benign"]["rate"] >= 0.5 and res["rarity"]["precision"] < 0.8
    assert res["conflict_x_rarity:0.5"]["kinds"]["rare_benign"]["rate"] >= 0.5


def test_user_files_path_prints_the_table(results, capsys):
    work, res = results
    assert main(["bci", "evaluate", "--index", str(work / "index"), "--labelled", str(work / "completions.jsonl"),
                 "--compliant", str(work / "heldout.jsonl"), "--modes", "evidence,rarity",
                 "--out", str(work / "user.json")]) == 0
    out = capsys.readouterr().out
    assert "| refused share | evidence | rarity |" in out and "**precision**" in out
    assert json.loads((work / "user.json").read_text())["evidence"]["precision"] == res["evidence"]["precision"]


def test_generator_is_deterministic_and_exact():
    small = SpanCorpusSizes(docs=300, procedures=6, recipes=6, also_benign=3, per_kind=4, heldout=10)
    a, b = generate_span_corpus(7, small), generate_span_corpus(7, small)
    assert a == b and a != generate_span_corpus(8, small)
    assert {c["kind"] for c in a["completions"]} == set(KINDS)
    assert all(c["label"] == KINDS[c["kind"]] for c in a["completions"])
