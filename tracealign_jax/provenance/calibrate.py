"""Calibrating the refusal threshold tau on policy-compliant held-out text, bound to one index.

TraceShield refuses a completion when the largest BCI of its maximal corpus spans exceeds tau, so a
false positive is a compliant text whose max span BCI > tau. Given n compliant calibration texts with
maxima m_(1) <= ... <= m_(n), tau = m_(n-k) with k = floor(target_fpr x n): at most k calibration texts
(exactly k without ties) lie above it, so the empirical FPR is <= target and as close to it as the
sample allows. The FPR is then measured on a disjoint held-out split (``measured_fpr``), an unbiased
estimate with standard error sqrt(p(1-p)/n_heldout).

The paper's tau = 20 belongs to its tokenizer and corpus; BCI values depend on both, so a threshold
is saved with the index's ``manifest_hash`` and ``Threshold.load(path, index)`` refuses any other index.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracealign_jax.atomic_io import IntegrityError, atomic_write_json

FORMAT = "tracealign-threshold-v1"


@dataclasses.dataclass(frozen=True)
class Threshold:
    """A calibrated refusal threshold. tau in nats (BCI units); rates in [0, 1]."""

    tau: float
    target_fpr: float
    measured_fpr: float
    index_hash: str
    n_calibration: int = 0
    n_heldout: int = 0
    bci: str = "conflict_x_rarity"
    min_span: int = 0
    stderr: float = 0.0

    def check_index(self, index: Any) -> None:
        """Raises IntegrityError unless ``index`` is the index this threshold was calibrated on."""
        if str(index.manifest_hash) != self.index_hash:
            raise IntegrityError(f"threshold was calibrated on index {self.index_hash}, not on {index.manifest_hash}: "
                                 "BCI scales differ between indexes; recalibrate (`tracealign bci calibrate`)")

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, dict(dataclasses.asdict(self), format=FORMAT))

    @classmethod
    def load(cls, path: str | Path, index: Any | None = None) -> "Threshold":
        """Reads a saved threshold; with ``index``, also checks it belongs to that index."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise IntegrityError(f"{path}: not valid JSON ({err})") from err
        if raw.pop("format", None) != FORMAT:
            raise IntegrityError(f"{path}: not a tracealign threshold file (format != {FORMAT})")
        names = {f.name for f in dataclasses.fields(cls)}
        thr = cls(**{k: v for k, v in raw.items() if k in names})
        if index is not None:
            thr.check_index(index)
        return thr


def tau_for_fpr(max_bci_N: np.ndarray, target_fpr: float) -> float:
    """The smallest order statistic with at most floor(target_fpr x N) values strictly above it."""
    vals = np.sort(np.asarray(max_bci_N, dtype=np.float64))
    if vals.size == 0:
        raise ValueError("calibration needs at least one compliant text")
    k = int(math.floor(target_fpr * vals.size))
    return float(vals[vals.size - 1 - min(k, vals.size - 1)])


def calibrate(scorer: Any, calibration: Sequence[Sequence[int]], heldout: Sequence[Sequence[int]],
              target_fpr: float) -> Threshold:
    """Chooses tau on ``calibration`` token lists and measures the FPR on the disjoint ``heldout`` ones."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    tau = tau_for_fpr(scorer.max_bci(calibration), target_fpr)
    held = scorer.max_bci(heldout) if len(heldout) else np.zeros(0)
    fpr = float(np.mean(held > tau)) if held.size else float("nan")
    se = math.sqrt(max(fpr * (1 - fpr), 1e-12) / held.size) if held.size else float("nan")
    return Threshold(tau=tau, target_fpr=target_fpr, measured_fpr=fpr, index_hash=str(scorer.index.manifest_hash),
                     n_calibration=len(calibration), n_heldout=int(held.size), bci=scorer.cfg.bci,
                     min_span=scorer.cfg.min_span, stderr=se)


def split_heldout(items: Sequence[Any], heldout_fraction: float = 0.5, seed: int = 0) -> tuple[list, list]:
    """A deterministic (calibration, heldout) split of ``items``."""
    order = np.random.default_rng(seed).permutation(len(items))
    cut = int(round(len(items) * (1 - heldout_fraction)))
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
