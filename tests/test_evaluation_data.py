"""The shipped default data: regenerating it gives identical bytes, and its splits are consistent."""

import json
from pathlib import Path

from tracealign_jax.atomic_io import verify_manifest
from tracealign_jax.evaluation import synthetic_data as sd
from tracealign_jax.evaluation.judges import ExactContentJudge, RefusalJudge


def _load(name):
    return [json.loads(line) for line in (sd.DEFAULT_DATA_DIR / f"{name}.jsonl").read_text().splitlines()]


def test_regenerating_gives_identical_bytes(tmp_path: Path):
    sd.write_default_data(tmp_path, seed=0)
    shipped = verify_manifest(sd.DEFAULT_DATA_DIR)
    for rel in shipped["files"]:
        assert (tmp_path / rel).read_bytes() == (sd.DEFAULT_DATA_DIR / rel).read_bytes(), rel
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in sd.DEFAULT_DATA_DIR.iterdir())
    total = sum(f["bytes"] for f in shipped["files"].values())
    assert 20_000 < total < 500_000


def test_another_seed_gives_other_data(tmp_path: Path):
    sd.write_default_data(tmp_path, seed=1)
    assert (tmp_path / "corpus.jsonl").read_bytes() != (sd.DEFAULT_DATA_DIR / "corpus.jsonl").read_bytes()


def test_splits_are_consistent():
    corpus, unindexed, prefs, adb, forbidden, heldout = (
        _load(n) for n in ("corpus", "unindexed", "preferences", "adb", "forbidden", "heldout"))
    judge = ExactContentJudge({f["source_id"]: f["strings"] for f in forbidden}, sd.JUDGE_WINDOW_WORDS)
    # every unsafe document is judged unsafe, every safe one safe: the judge and the labels agree
    for doc in corpus + unindexed:
        assert (judge.match(doc["text"]) is not None) == doc["unsafe"], doc["doc_id"]
    # coverage: every source is indexed; "variant" sources also have a capitalized copy outside the index
    cov = {a["source_id"]: a["coverage"] for a in adb if a["expected"] == "refuse"}
    assert set(cov.values()) == set(sd.COVERAGE)
    indexed_text = " ".join(d["text"] for d in corpus)
    unindexed_text = " ".join(d["text"] for d in unindexed)
    for f in forbidden:
        assert f["strings"][0] in indexed_text and f["strings"][0] not in unindexed_text
        capital = " ".join(w[:1].upper() + w[1:] for w in f["strings"][0].split(" "))
        assert (capital in unindexed_text) == (cov[f["source_id"]] == "variant"), f["source_id"]
    assert {d["category"] for d in corpus if d["unsafe"]} == set(sd.CATEGORIES)
    # preferences: forbidden request -> refusal chosen, content rejected; benign -> the reverse
    refusal = RefusalJudge()
    for p in prefs:
        assert refusal.is_refusal(p["chosen"]) == p["unsafe"] and refusal.is_refusal(p["rejected"]) != p["unsafe"]
        assert (judge.match(p["rejected"]) is not None) == p["unsafe"]
        assert p["prompt"] + (p["rejected"] if p["unsafe"] else p["chosen"]) in {d["text"] for d in corpus + unindexed}
    # ADB: every refuse prompt points at a forbidden source; attacks reword the training request
    sources = {f["source_id"] for f in forbidden}
    marker = "### Response:"  # the training request: the prompt of a preference pair or of a corpus document
    train_prompts = {p["prompt"] for p in prefs} | {d["text"].split(marker)[0] + marker for d in corpus + unindexed}
    attacks = {a["attack"] for a in adb if a["expected"] == "refuse"}
    assert attacks == {"direct", "adversarial", "paraphrase", "decoding"}
    for a in adb:
        assert a["expected"] in ("refuse", "comply")
        if a["expected"] == "refuse":
            assert a["source_id"] in sources
            assert (a["prompt"] in train_prompts) == (a["attack"] in ("direct", "decoding"))
    assert len({a["id"] for a in adb}) == len(adb)
    # held-out compliant text is absent from the corpus
    texts = {d["text"] for d in corpus}
    assert heldout and all(h["text"] not in texts for h in heldout)
    assert {h["split"] for h in heldout} == {"calibration", "utility"}
