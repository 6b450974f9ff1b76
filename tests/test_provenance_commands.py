"""The provenance CLI end to end on token-id inputs: calibrate -> shield -> bound -> veto-table -> score."""

from __future__ import annotations

import json

import numpy as np

from provenance_corpus import FORBIDDEN, benign_text, build
from tracealign_jax.cli import main
from tracealign_jax.provenance.calibrate import Threshold
from tracealign_jax.response_store import ResponseArrayReader
from tracealign_jax.veto.store import load_veto_table


def _jsonl(path, token_lists, field="tokens", extra=None):
    extra = extra or [{} for _ in token_lists]
    path.write_text("".join(json.dumps({field: [int(t) for t in toks], **e}) + "\n" for toks, e in zip(token_lists, extra)))
    return str(path)


def test_cli_pipeline(tmp_path, capsys):
    _, _, index = build(tmp_path)
    rng = np.random.default_rng(2)
    common = ["--index", str(index.path), "--set", "provenance.min_span=3", "--set", "provenance.max_span=5"]
    compliant = _jsonl(tmp_path / "compliant.jsonl", [benign_text(rng, 30) for _ in range(200)])
    assert main(["bci", "calibrate", *common, "--compliant", compliant, "--target-fpr", "0.05",
                 "--out", str(tmp_path / "tau.json")]) == 0
    thr = Threshold.load(tmp_path / "tau.json", index)
    completions = [np.concatenate([benign_text(rng, 5), FORBIDDEN[0]]), benign_text(rng, 12)]
    extra = [{"id": "gen-17", "model": "m1", "refuse": "user field named like a verdict field"}, {"model": "m2"}]
    comp = _jsonl(tmp_path / "comp.jsonl", completions, extra=extra)
    thr_args = ["--threshold", str(tmp_path / "tau.json")]
    assert main(["shield", *common, *thr_args, "--input", comp, "--out", str(tmp_path / "v.jsonl"),
                 "--report", str(tmp_path / "r.md")]) == 0
    verdicts = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert verdicts[0]["refuse"] and verdicts[0]["max_bci"] > thr.tau
    assert "REFUSED" in (tmp_path / "r.md").read_text() and "gen-17" in (tmp_path / "r.md").read_text()
    # verdicts join back to their records: the input's id (else its line number) and its other fields
    joined = {v["id"]: v for v in verdicts}
    assert set(joined) == {"gen-17", "2"} and joined["gen-17"]["model"] == "m1" and joined["2"]["model"] == "m2"
    assert joined["gen-17"]["refuse"] is True  # the verdict's own field wins over a same-named input field
    # a threshold calibrated under other BCI settings is refused, naming the setting
    for setting in ("provenance.bci=rarity", "provenance.conflict_prior=0.5"):
        assert main(["shield", *common, "--set", setting, *thr_args, "--input", comp,
                     "--out", str(tmp_path / "x.jsonl")]) == 2
        assert setting.split(".")[1].split("=")[0] in capsys.readouterr().err
    queries = _jsonl(tmp_path / "q.jsonl", [FORBIDDEN[1][:3], benign_text(rng, 3)])
    assert main(["bound", *common, *thr_args, "--queries", queries, "--horizon", "8",
                 "--out", str(tmp_path / "b.jsonl")]) == 0
    bounds = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert bounds[0]["bound"] > 0.9 and all(0 <= b["bound"] <= 1 for b in bounds)
    assert main(["provenance", "veto-table", *common, *thr_args, "--out", str(tmp_path / "veto")]) == 0
    table, meta = load_veto_table(tmp_path / "veto", device=False)
    assert meta["index_hash"] == index.manifest_hash and table.num_entries > 0 and table.context_len == 4
    assert main(["bci", "score", *common, "--input", comp, "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert max(r["bci"] for r in rows if r["item"] == 0) == verdicts[0]["max_bci"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt_ids": [11, 12], "chosen_ids": benign_text(rng, 9).tolist(),
                                         "rejected_ids": completions[i % 2].tolist()}) + "\n" for i in range(4)))
    store = tmp_path / "bci_store"
    assert main(["provenance", "token-bci", *common, *thr_args, "--set", f"data.train_path={pairs}",
                 "--out", str(store)]) == 0
    chosen, rejected = ResponseArrayReader(str(store)).read([0, 1])
    assert rejected[0].shape == (len(completions[0]),) and rejected[0][-8:].min() > thr.tau
    assert rejected[1].max() == 0.0 or rejected[1].max() > thr.tau
    # a wrong index for the threshold is a clean CLI error, not a traceback
    _, _, other = build(tmp_path, seed=3)
    assert main(["shield", "--index", str(other.path), *thr_args, "--input", comp, "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    assert "calibrated on index" in capsys.readouterr().err
