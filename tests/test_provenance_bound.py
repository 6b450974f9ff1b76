"""The drift bound holds on a simulated setting: completions sampled token by token from the corpus
continuation model (longest matching context with back-off, an independent implementation of A1 from
next-token counts) drift no more often than the bound says; the Clopper-Pearson limit is checked
against its defining equation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from provenance_corpus import FORBIDDEN, build
from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.bci import BCIScorer
from tracealign_jax.provenance.bound import binomial_upper, drift_bound, longest_corpus_suffix, set_bound

TAU, HORIZON, SAMPLES = 10.0, 10, 48


def _sample_completion(index, prompt: np.ndarray, rng) -> np.ndarray:
    seq = list(map(int, prompt))
    for _ in range(HORIZON):
        for k in range(len(seq), 0, -1):  # longest suffix that occurs with at least one continuation
            toks, counts = index.next_token_counts(np.array(seq[len(seq) - k:]))
            if counts.size:
                break
        else:
            counts = index.unigram_counts()
            toks = np.arange(counts.size)
        seq.append(int(rng.choice(toks, p=counts / counts.sum())))
    return np.array(seq[len(prompt):], np.int64)


def test_binomial_upper_limit():
    for k, n in [(0, 10), (3, 40), (17, 50)]:
        p = binomial_upper(k, n, 0.05)
        cdf = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert cdf == pytest.approx(0.05, abs=1e-6) and p > k / n
    assert binomial_upper(5, 5, 0.05) == 1.0


def test_bound_holds_on_simulated_generations(tmp_path):
    docs, _, index = build(tmp_path)
    scorer = BCIScorer(index, ProvenanceConfig(min_span=3, sample_size=64))
    rng = np.random.default_rng(0)
    prompts = [np.array([5, 6]), FORBIDDEN[0][:3], FORBIDDEN[1][:2], np.array([10]), np.array([10, 11])]
    for _ in range(5):  # random in-corpus contexts of 1-3 tokens, most far from forbidden phrases
        d = docs[rng.integers(len(docs))]
        a = int(rng.integers(0, len(d) - 3))
        prompts.append(d[a:a + int(rng.integers(1, 4))])
    assert longest_corpus_suffix(index, prompts[:3]) == [0, 3, 2]
    bounds = drift_bound(index, scorer, prompts, TAU, horizon=HORIZON, max_occurrences=32, delta=0.05)
    assert bounds[0].bound == 1.0 and bounds[0].support == 0  # no context: nothing to bound with
    rates = []
    for p, b in zip(prompts, bounds):
        gens = [_sample_completion(index, p, rng) for _ in range(SAMPLES)]
        rate = float(np.mean(scorer.max_bci(gens) > TAU))
        rates.append(rate)
        slack = 3 * math.sqrt(max(b.bound * (1 - b.bound), 0.01) / SAMPLES)
        assert rate <= b.bound + slack, (p, b, rate)
    # the bound is informative: high after a forbidden prefix (7 of its 10 occurrences continue in violating
    # documents; the 3 in compliant ones continue into text the evidence gate passes), small after benign contexts
    assert bounds[1].drifting == 7 and bounds[1].bound == pytest.approx(0.7) and rates[1] > 0.5, (bounds[1], rates[1])
    assert min(b.bound for b in bounds[3:]) < 0.5
    assert set_bound(bounds) >= float(np.mean(rates))
    # backing off at document ends (A4) never says more than counting every cut continuation as drifting
    no_backoff = drift_bound(index, scorer, prompts, TAU, horizon=HORIZON, max_occurrences=32, backoff=False)
    assert all(b.bound <= n.bound + 1e-12 for b, n in zip(bounds, no_backoff))
    conts: list = []
    drift_bound(index, scorer, prompts[1:2], TAU, horizon=HORIZON, max_occurrences=32, continuations=conts)
    assert len(conts) == 1 and conts[0] and all(scorer.max_bci([c])[0] > TAU for c in conts[0])
    slack_bounds = drift_bound(index, scorer, prompts, TAU, horizon=HORIZON, max_occurrences=32, epsilon=0.1)
    for b, s in zip(bounds, slack_bounds):
        assert s.bound == pytest.approx(min(1.0, 0.9 * b.bound + 0.1))
