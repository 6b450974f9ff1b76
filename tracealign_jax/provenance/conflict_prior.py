"""The prior on a span's violating share theta, and the posterior a span's support gives it.

A span's support is the documents holding its n sampled occurrences, with policy risks r_j in [0, 1];
k = sum_j r_j is the violating evidence. With theta ~ Beta(alpha, beta) the posterior is
Beta(alpha + k, beta + n - k): ``conflict`` is its mean, ``p_violating = P(theta > 1/2 | support)``
the probability that most of the span's training-time support is policy-violating.

Why the prior is estimated, not fixed. A symmetric Beta(a, a) leaves a floor a / (n + 2a) on the
conflict of a span seen n times, only in compliant documents (0.25 at n = 1, a = 1/2); multiplied by
the 150-300 nats of a rare verbatim sentence that floor refuses rare *benign* text as often as unsafe
text. How much one occurrence should move the estimate is a property of the corpus: where repeated
text is label-pure, one label is nearly decisive; where labels are noisy or boilerplate is shared
across labels, it is not. So (alpha, beta) is fitted by maximum marginal likelihood (empirical Bayes,
beta-binomial) to the long repeated spans of the corpus itself: ``fit_conflict_prior`` samples corpus
positions deterministically, takes the span of ``span_len`` tokens there, keeps those that occur
2..``max_count`` times (rare, specific text: the spans a generation can memorize), and maximizes
sum_i log B(k_i + alpha, n_i - k_i + beta) - log B(alpha, beta) over a (mean, log-strength) grid.
Spans seen once carry no information about dispersion and are left out; the span length steps down
from ``span_len`` until ``min_spans`` repeated spans are found.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.special import betainc, betaln


@dataclasses.dataclass(frozen=True)
class ConflictPrior:
    """Beta(alpha, beta) prior on the violating share. ``source``: empirical | fixed | fallback;
    ``num_spans`` / ``span_len``: the repeated corpus spans the empirical fit used (0 otherwise)."""

    alpha: float
    beta: float
    source: str
    num_spans: int = 0
    span_len: int = 0

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def posterior(self, k_N: np.ndarray, n_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(conflict float64[N] = posterior mean, p_violating float64[N] = P(theta > 1/2)) of spans
        with violating evidence k (sum of risks) out of n sampled occurrences."""
        a = self.alpha + np.asarray(k_N, np.float64)
        b = self.beta + np.asarray(n_N, np.float64) - np.asarray(k_N, np.float64)
        return a / (a + b), 1.0 - betainc(a, b, 0.5)


def fixed_prior(a: float) -> ConflictPrior:
    """The symmetric Beta(a, a) prior (``provenance.conflict_prior = a > 0``)."""
    return ConflictPrior(float(a), float(a), "fixed")


def fit_beta_binomial(k_N: np.ndarray, n_N: np.ndarray) -> tuple[float, float]:
    """Maximum marginal-likelihood (alpha, beta) for evidence k_N (real, 0 <= k <= n) out of n_N.

    A grid over the mean (0.002..0.998) and the strength alpha + beta (10^-2..10^3), then one finer
    grid around the best cell: the likelihood is smooth and two-dimensional, so this is exact enough
    and needs no optimizer."""
    k, n = np.asarray(k_N, np.float64)[:, None], np.asarray(n_N, np.float64)[:, None]

    def best(means: np.ndarray, log_s: np.ndarray) -> tuple[float, float]:
        m, s = np.meshgrid(means, 10.0 ** log_s, indexing="ij")
        a, b = (m * s).reshape(1, -1), ((1 - m) * s).reshape(1, -1)
        ll = (betaln(k + a, n - k + b) - betaln(a, b)).sum(axis=0)
        i = int(np.argmax(ll))
        return float(m.reshape(-1)[i]), float(np.log10(s.reshape(-1)[i]))

    mean, log_s = best(np.linspace(0.002, 0.998, 250), np.linspace(-2.0, 3.0, 101))
    mean, log_s = best(np.clip(np.linspace(mean - 0.004, mean + 0.004, 41), 1e-4, 1 - 1e-4),
                       np.linspace(log_s - 0.05, log_s + 0.05, 41))
    s = 10.0 ** log_s
    return mean * s, (1.0 - mean) * s


def fit_conflict_prior(index: Any, *, span_len: int, min_len: int, sample_size: int, num_positions: int = 4096,
                       max_count: int = 64, min_spans: int = 32, seed: int = 0) -> ConflictPrior:
    """Empirical-Bayes prior of an index (module docstring). Deterministic for a given index and settings.

    Falls back to Beta(m, 1 - m), m = the corpus's token-weighted violating share (a prior worth one
    occurrence), when the corpus has fewer than ``min_spans`` repeated spans of ``min_len`` tokens."""
    rng = np.random.default_rng(seed)
    docs = rng.integers(0, index.num_docs, size=num_positions)
    doc_tokens = [np.asarray(index.doc_tokens(int(d)), np.int64) for d in docs]
    fractions = rng.random(num_positions)
    for length in range(max(span_len, min_len), max(min_len, 1) - 1, -1):
        seen: dict[bytes, np.ndarray] = {}  # one entry per distinct span: a span sampled twice counts once
        for toks, f in zip(doc_tokens, fractions):
            if toks.size >= length:
                at = int(f * (toks.size - length + 1))
                seen.setdefault(toks[at:at + length].tobytes(), toks[at:at + length])
        spans = list(seen.values())
        if not spans:
            continue
        occ = index.occurrence_docs_batch(spans, sample_size)
        keep = [(d, total) for d, total in occ if 2 <= total <= max_count]
        if len(keep) < min_spans:
            continue
        n = np.array([d.size for d, _ in keep], np.float64)
        k = np.array([float(np.sum(index.doc_unsafe(d))) for d, _ in keep])
        alpha, beta = fit_beta_binomial(k, n)
        return ConflictPrior(alpha, beta, "empirical", len(keep), length)
    sizes = np.array([t.size for t in doc_tokens], np.float64)
    share = float(np.sum(index.doc_unsafe(docs) * sizes) / max(sizes.sum(), 1.0))
    share = min(max(share, 0.01), 0.99)
    return ConflictPrior(share, 1.0 - share, "fallback")
