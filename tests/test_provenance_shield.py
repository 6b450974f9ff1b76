"""Calibration reaches its target FPR on held-out compliant text; a threshold never applies to another
index; TraceShield refuses exactly the completions with a planted high-BCI span, passes paraphrases
that share no long span, and attributes refusals to the right documents."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from provenance_corpus import FORBIDDEN, benign_text, build, naive_longest, naive_occurrences
from tracealign_jax.atomic_io import IntegrityError
from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.bci import BCIScorer
from tracealign_jax.provenance.calibrate import Threshold, calibrate, tau_for_fpr
from tracealign_jax.provenance.shield import TraceShield, render_report, write_jsonl

CFG = ProvenanceConfig(min_span=3, sample_size=256)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shield")
    docs, meta, index = build(tmp)
    scorer = BCIScorer(index, CFG)
    rng = np.random.default_rng(11)
    texts = [benign_text(rng, 30) for _ in range(900)]
    return docs, meta, index, scorer, texts, tmp


def test_tau_order_statistic():
    vals = np.arange(100, dtype=float)
    assert tau_for_fpr(vals, 0.05) == 94.0  # exactly 5 values above
    assert tau_for_fpr(vals, 0.0) == 99.0
    assert tau_for_fpr([3.0], 0.5) == 3.0


def test_calibration_reaches_target_fpr_on_heldout(setup):
    _, _, index, scorer, texts, tmp = setup
    target = 0.1
    thr = calibrate(scorer, texts[:450], texts[450:], target, confidence=0.0)
    assert np.mean(scorer.max_bci(texts[:450]) > thr.tau) <= target
    se = math.sqrt(target * (1 - target) / 450)
    assert abs(thr.measured_fpr - target) <= 3 * se + 1 / 450, (thr.measured_fpr, se)
    assert thr.index_hash == index.manifest_hash and thr.n_heldout == 450
    thr.save(tmp / "tau.json")
    assert Threshold.load(tmp / "tau.json", index, scorer.settings()) == thr
    _, _, other = build(tmp, seed=1)
    with pytest.raises(IntegrityError):
        Threshold.load(tmp / "tau.json", other)
    with pytest.raises(IntegrityError):
        TraceShield(other, BCIScorer(other, CFG), thr)


def test_certified_calibration_bounds_the_fpr(setup):
    """At confidence c, at most k calibration texts lie above tau, where k is the largest count whose
    Clopper-Pearson upper limit (scipy's beta quantile, an independent implementation) is <= target."""
    from scipy import stats

    _, _, index, scorer, texts, tmp = setup
    target, n = 0.05, 450
    thr = calibrate(scorer, texts[:n], texts[n:], target, confidence=0.95)
    above = int(np.sum(scorer.max_bci(texts[:n]) > thr.tau))
    upper = lambda k: stats.beta(k + 1, n - k).ppf(0.95)  # noqa: E731
    k = max(j for j in range(n) if upper(j) <= target)
    assert above <= k and thr.certified_fpr == pytest.approx(upper(k), abs=1e-6) and thr.certified_fpr <= target
    assert thr.measured_fpr <= target
    with pytest.warns(UserWarning, match="cannot certify"):
        few = calibrate(scorer, texts[:10], texts[10:20], 0.02, confidence=0.95)
    assert few.tau == pytest.approx(float(scorer.max_bci(texts[:10]).max())) and few.certified_fpr > 0.02


def test_threshold_refused_under_other_bci_settings(setup):
    import dataclasses

    _, _, index, scorer, texts, tmp = setup
    thr = calibrate(scorer, texts[:300], texts[300:400], 0.05)
    thr.save(tmp / "tau_settings.json")
    assert Threshold.load(tmp / "tau_settings.json", index, scorer.settings()) == thr
    text = (tmp / "tau_settings.json").read_text()  # one changed digit of tau is refused, not used
    flipped = text.replace(f'"tau": {thr.tau!r}', f'"tau": {thr.tau + 1.0!r}')
    assert flipped != text
    (tmp / "tau_flipped.json").write_text(flipped)
    with pytest.raises(IntegrityError, match="SHA-256"):
        Threshold.load(tmp / "tau_flipped.json", index, scorer.settings())
    for change, named in (({"bci": "rarity"}, "bci"), ({"conflict_prior": 0.5}, "conflict_prior"),
                          ({"sample_size": 32}, "sample_size"), ({"min_posterior": 0.9}, "min_posterior")):
        other = BCIScorer(index, dataclasses.replace(CFG, **change))
        with pytest.raises(IntegrityError, match=named):
            Threshold.load(tmp / "tau_settings.json", index, other.settings())


def _paraphrase(phrase: np.ndarray, rng) -> np.ndarray:
    """The same forbidden tokens, reordered with benign words between pairs: no 3-token corpus span."""
    out = []
    for a, b in zip(phrase[1::2], phrase[0::2]):
        out += [int(a), int(b), int(benign_text(rng, 1)[0])]
    return np.array(out, np.int64)


def test_shield_refuses_exactly_planted_completions(setup):
    docs, _, index, scorer, texts, tmp = setup
    thr = calibrate(scorer, texts[:450], texts[450:], 0.0, confidence=0.0)
    rng = np.random.default_rng(5)
    completions, planted, paraphrases = [], [], []
    for i in range(24):
        kind = i % 3
        pre, post = benign_text(rng, 6), benign_text(rng, 5)
        phrase = FORBIDDEN[i % len(FORBIDDEN)]
        mid = {0: phrase, 1: _paraphrase(phrase, rng), 2: benign_text(rng, 8)}[kind]
        completions.append(np.concatenate([pre, mid, post]))
        planted.append(kind == 0)
        if kind == 1:
            paraphrases.append(mid)
    for mid in paraphrases[:3]:  # the paraphrases really share no long span with the corpus
        assert max(naive_longest(docs, mid, j) for j in range(len(mid))) < CFG.min_span
    shield = TraceShield(index, scorer, thr, top_sources=2)
    verdicts = shield.check_batch(completions)
    assert [v.refuse for v in verdicts] == planted
    for v, c, p in zip(verdicts, completions, planted):
        assert v.refuse == (v.max_bci > thr.tau)
        if not p:
            continue
        top = v.spans[0]
        phrase = c[top.start:top.end]
        assert any(np.array_equal(phrase[k:k + 8], f) for f in FORBIDDEN for k in range(len(phrase) - 7))
        occ = set(naive_occurrences(docs, phrase))
        assert top.count == len(occ) and len(top.sources) == min(2, len(occ))
        for src in top.sources:  # sources are true occurrences, riskiest documents first
            assert (src.doc_id, src.offset) in occ
        assert top.sources[0].risk >= top.sources[-1].risk
    # the one-span-at-a-time path agrees with the batched one
    seq = shield.check_sequential(completions)
    assert [v.refuse for v in seq] == [v.refuse for v in verdicts]
    np.testing.assert_allclose([v.max_bci for v in seq], [v.max_bci for v in verdicts], rtol=1e-12)
    write_jsonl(verdicts, tmp / "v.jsonl")
    rows = [json.loads(line) for line in (tmp / "v.jsonl").read_text().splitlines()]
    assert [r["refuse"] for r in rows] == planted and rows[0]["spans"][0]["sources"][0]["snippet"]
    report = render_report(verdicts)
    assert f"refused: {sum(planted)}" in report and "## Completion 0: REFUSED" in report
