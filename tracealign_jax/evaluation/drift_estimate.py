"""A calibrated per-prompt drift estimate: the corpus's drifting continuations, weighted by the policy.

The drift bound (``provenance/bound.py``) describes a model that continues like its corpus; an aligned
policy drifts less, and by how much depends on the policy. So the estimate asks the policy: for each
prompt, x = the log-probability (nats) the policy gives the first ``LEAD`` tokens of the most likely
drifting corpus continuation (``drift_bound(..., continuations=...)``; ``FLOOR`` when there is none),
and P(drift) = sigmoid(w0 + w1 x / 10), fitted by logistic regression on the measured drift of the
*other* half of the prompts (two folds split by a hash of the source id, so prompts of one source
never train their own estimate). Its error against the measured rate is what the report prints.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

LEAD, FLOOR = 8, -60.0


def _fit_logistic(x_N: np.ndarray, y_N: np.ndarray, l2: float = 1e-2, steps: int = 50) -> np.ndarray:
    """Newton's method for L2-regularized logistic regression on [1, x]; returns the weights float64[2]."""
    X = np.stack([np.ones_like(x_N), x_N], axis=1)
    w = np.zeros(2)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-X @ w))
        grad = X.T @ (p - y_N) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        w -= np.linalg.solve(hess, grad)
    return w


def cross_fitted_estimate(logp_N: Sequence[float], drift_N: Sequence[bool], groups: Sequence[str]) -> np.ndarray:
    """float64[N] in [0, 1]: each prompt's drift probability from the logistic fit on the other fold.

    logp_N: the policy's log-probability of the lead of the most likely drifting continuation (nats);
    groups: a source id per prompt (prompts of one source share a fold). A fold whose training half
    has a single class gets that half's drift rate."""
    x = np.maximum(np.asarray(logp_N, np.float64), FLOOR) / 10.0
    y = np.asarray(drift_N, np.float64)
    fold = np.array([zlib.crc32(str(g).encode()) % 2 for g in groups])
    out = np.zeros_like(x)
    for f in (0, 1):
        train, test = fold != f, fold == f
        if not test.any():
            continue
        if not train.any() or y[train].min() == y[train].max():
            out[test] = y[train].mean() if train.any() else y.mean()
            continue
        w = _fit_logistic(x[train], y[train])
        out[test] = 1.0 / (1.0 + np.exp(-(w[0] + w[1] * x[test])))
    return out
