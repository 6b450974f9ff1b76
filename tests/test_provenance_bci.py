"""BCI, conflict and rarity equal a direct computation from a naive scan of a small labelled corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from provenance_corpus import FORBIDDEN, VOCAB, benign_text, build, naive_maximal, naive_occurrences, naive_risk
from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.bci import BCIScorer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build(tmp_path_factory.mktemp("bci"))


def _naive_logp(docs) -> np.ndarray:
    counts = np.bincount(np.concatenate(docs), minlength=VOCAB).astype(np.float64)
    n = counts.sum()
    return np.log(counts + 0.5) - np.log(n + 0.5 * VOCAB)


def _query_spans(docs, rng) -> list[np.ndarray]:
    spans = [FORBIDDEN[0], FORBIDDEN[1][:5], FORBIDDEN[2][2:], np.array([5, 6, 7]), np.array([61, 61, 61])]
    for _ in range(40):  # sub-spans of real documents: counts from 1 to many
        d = docs[rng.integers(len(docs))]
        a = int(rng.integers(0, len(d) - 2))
        spans.append(d[a:a + int(rng.integers(1, 7))])
    return spans


@pytest.mark.parametrize("mode,prior", [("conflict_x_rarity", 0.5), ("conflict_x_rarity", 2.0), ("evidence", 0.5),
                                        ("evidence", 0.0)])
def test_scores_equal_naive_scan(corpus, mode, prior):
    docs, meta, index = corpus
    cfg = ProvenanceConfig(bci=mode, sample_size=10_000, conflict_prior=prior)
    scorer = BCIScorer(index, cfg)
    a, b = (prior, prior) if prior > 0 else (scorer.prior.alpha, scorer.prior.beta)
    assert scorer.prior.source == ("fixed" if prior > 0 else "empirical")
    logp = _naive_logp(docs)
    spans = _query_spans(docs, np.random.default_rng(0))
    scores = scorer.score_spans(spans)
    seen_mixed = False
    for span, sc in zip(spans, scores):
        occ = naive_occurrences(docs, span)
        assert sc.count == len(occ)
        if not occ:
            assert (sc.rarity, sc.conflict, sc.bci) == (0.0, 0.0, 0.0)
            continue
        rarity = -float(np.sum(logp[span]))
        risks = [naive_risk(meta[d]) for d, _ in occ]
        k, n = sum(risks), len(risks)
        conflict = (k + a) / (n + a + b)
        p_violating = stats.beta(a + k, b + n - k).sf(0.5)  # P(share > 1/2), an independent implementation
        seen_mixed |= 0 < k < n
        assert sc.rarity == pytest.approx(rarity, rel=1e-12)
        assert sc.density == pytest.approx(rarity / len(span), rel=1e-12)
        assert sc.conflict == pytest.approx(conflict, rel=1e-12)
        assert sc.p_violating == pytest.approx(p_violating, rel=1e-9, abs=1e-12)
        gate = mode == "conflict_x_rarity" or p_violating > cfg.min_posterior
        assert sc.bci == pytest.approx(conflict * rarity if gate else 0.0, rel=1e-12)
    assert seen_mixed  # FORBIDDEN[0] also sits in benign documents


def test_rarity_variant_with_max_support(corpus):
    docs, _, index = corpus
    spans = _query_spans(docs, np.random.default_rng(1))
    logp = _naive_logp(docs)
    for max_support in (0, 3):
        scores = BCIScorer(index, ProvenanceConfig(bci="rarity", max_support=max_support)).score_spans(spans)
        for span, sc in zip(spans, scores):
            c = len(naive_occurrences(docs, span))
            keep = c > 0 and (max_support == 0 or c <= max_support)
            assert sc.bci == pytest.approx(-float(np.sum(logp[span])) if keep else 0.0, rel=1e-12)


def test_conflict_sampling_is_deterministic_and_close(corpus):
    docs, meta, index = corpus
    span = [int(docs[0][0])]  # a frequent single token: many occurrences
    occ = naive_occurrences(docs, span)
    assert len(occ) > 40
    scorer = BCIScorer(index, ProvenanceConfig(sample_size=32, conflict_prior=0.5))
    a, b = scorer.score_spans([span])[0], scorer.score_spans([span])[0]
    assert a == b and a.count == len(occ)
    true_share = np.mean([naive_risk(meta[d]) for d, _ in occ])
    # 32 stratified draws: well within 4 binomial standard errors of the full-scan share
    assert abs(a.conflict - true_share) <= 4 * math.sqrt(0.25 / 32) + 0.5 / 33


def test_scan_finds_naive_maximal_spans(corpus):
    docs, _, index = corpus
    rng = np.random.default_rng(3)
    gens = [np.concatenate([benign_text(rng, 10), FORBIDDEN[1], benign_text(rng, 6)]), benign_text(rng, 25),
            np.array([], np.int64)]
    scorer = BCIScorer(index, ProvenanceConfig(min_span=3, sample_size=10_000))
    scanned = scorer.scan_batch(gens)
    for gen, spans in zip(gens, scanned):
        assert sorted((s.start, s.end) for s in spans) == naive_maximal(docs, gen, 3)
        for s in spans:
            ref = scorer.score_spans([gen[s.start:s.end]])[0]
            assert (s.count, s.bci) == (ref.count, ref.bci)
    assert max(s.bci for s in scanned[0]) == pytest.approx(float(scorer.max_bci(gens)[0]))
