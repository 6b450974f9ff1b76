"""Calibrating the refusal threshold tau on policy-compliant held-out text, bound to one index.

TraceShield refuses a completion when the largest BCI of its maximal corpus spans exceeds tau, so a
false positive is a compliant text whose max span BCI > tau. Given n compliant calibration texts with
maxima m_(1) <= ... <= m_(n), tau = m_(n-k), where k is

  confidence = 0 : floor(target_fpr x n), the empirical quantile: FPR about the target, half the
                   time above it;
  confidence = c : the largest k whose one-sided Clopper-Pearson upper limit at level c on the FPR of
                   tau (k of n calibration texts above it) is <= target_fpr: the FPR is <= target with
                   probability >= c over the draw of the calibration set (default c = 0.95).

When even k = 0 cannot certify the target (n < log(1 - c) / log(1 - target), 149 texts for 2% at 95%),
tau is the maximum and ``certified_fpr`` says what n certifies; ``calibrate`` warns. The FPR is then
measured on a disjoint held-out split (``measured_fpr``, standard error sqrt(p(1-p)/n_heldout)).

A threshold belongs to the scores that made it. BCI values depend on the tokenizer, the corpus and
every scoring setting, so a threshold is saved with the index's ``manifest_hash`` and the scorer's
``settings()`` (mode, prior, sample size, ...); ``Threshold.load(path, index, settings)`` refuses any
other index or settings, naming the difference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
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
    bci: str = "evidence"
    min_span: int = 0
    stderr: float = 0.0
    confidence: float = 0.0
    certified_fpr: float = float("nan")
    settings: dict = dataclasses.field(default_factory=dict)

    def check_settings(self, settings: dict, path: str | Path = "threshold") -> None:
        """Raises IntegrityError naming every scoring setting that differs from the calibration's."""
        diff = {k: (self.settings.get(k), v) for k, v in settings.items() if self.settings.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: calibrated with {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise IntegrityError(f"{path}: tau was calibrated under other BCI settings ({what}); BCI values are "
                                 "not comparable across settings: recalibrate (`tracealign bci calibrate`) or "
                                 "use the calibration's settings")

    def check_index(self, index: Any) -> None:
        """Raises IntegrityError unless ``index`` is the index this threshold was calibrated on."""
        if str(index.manifest_hash) != self.index_hash:
            raise IntegrityError(f"threshold was calibrated on index {self.index_hash}, not on {index.manifest_hash}: "
                                 "BCI scales differ between indexes; recalibrate (`tracealign bci calibrate`)")

    def save(self, path: str | Path) -> None:
        """Writes the threshold with a SHA-256 of its content (``load`` refuses an edited or damaged file)."""
        payload = dict(dataclasses.asdict(self), format=FORMAT)
        atomic_write_json(path, dict(payload, sha256=_digest(payload)))

    @classmethod
    def load(cls, path: str | Path, index: Any | None = None, settings: dict | None = None) -> "Threshold":
        """Reads a saved threshold; with ``index`` / ``settings`` (``BCIScorer.settings()``), also checks
        it belongs to that index and was calibrated under those scoring settings."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise IntegrityError(f"{path}: not valid JSON ({err})") from err
        digest = raw.pop("sha256", None)
        if digest is not None and digest != _digest(raw):
            raise IntegrityError(f"{path}: content does not match its SHA-256 (edited or corrupted): recalibrate "
                                 "(`tracealign bci calibrate`)")
        if raw.pop("format", None) != FORMAT:
            raise IntegrityError(f"{path}: not a tracealign threshold file (format != {FORMAT})")
        names = {f.name for f in dataclasses.fields(cls)}
        thr = cls(**{k: v for k, v in raw.items() if k in names})
        if index is not None:
            thr.check_index(index)
        if settings is not None:
            thr.check_settings(settings, path)
        return thr


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def allowed_above(n: int, target_fpr: float, confidence: float) -> tuple[int, float]:
    """(k, certified FPR): how many of n calibration texts may lie above tau (module docstring), and
    the FPR that choice certifies at ``confidence`` (the empirical k / n when confidence = 0)."""
    from tracealign_jax.provenance.bound import binomial_upper

    if confidence <= 0.0:
        k = int(math.floor(target_fpr * n))
        return k, k / n
    k = 0
    while k + 1 < n and binomial_upper(k + 1, n, 1.0 - confidence) <= target_fpr:
        k += 1
    return k, binomial_upper(k, n, 1.0 - confidence)


def tau_for_fpr(max_bci_N: np.ndarray, target_fpr: float, confidence: float = 0.0) -> float:
    """The order statistic with ``allowed_above(N, target_fpr, confidence)[0]`` values above it (ties aside)."""
    vals = np.sort(np.asarray(max_bci_N, dtype=np.float64))
    if vals.size == 0:
        raise ValueError("calibration needs at least one compliant text")
    k, _ = allowed_above(vals.size, target_fpr, confidence)
    return float(vals[vals.size - 1 - min(k, vals.size - 1)])


def calibrate(scorer: Any, calibration: Sequence[Sequence[int]], heldout: Sequence[Sequence[int]],
              target_fpr: float, confidence: float = 0.95) -> Threshold:
    """Chooses tau on ``calibration`` token lists and measures the FPR on the disjoint ``heldout`` ones."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    if not 0.0 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0, 1), got {confidence}")
    n = len(calibration)
    tau = tau_for_fpr(scorer.max_bci(calibration), target_fpr, confidence)
    certified = allowed_above(n, target_fpr, confidence)[1]
    if certified > target_fpr:
        need = (f"give at least {math.ceil(math.log(1.0 - confidence) / math.log(1.0 - target_fpr))} texts"
                if target_fpr > 0 else "no finite set certifies FPR 0")
        warnings.warn(f"{n} calibration texts cannot certify FPR <= {target_fpr} at confidence {confidence}: tau is "
                      f"their maximum, which certifies only FPR <= {certified:.3f}; {need}", stacklevel=2)
    held = scorer.max_bci(heldout) if len(heldout) else np.zeros(0)
    fpr = float(np.mean(held > tau)) if held.size else float("nan")
    se = math.sqrt(max(fpr * (1 - fpr), 1e-12) / held.size) if held.size else float("nan")
    return Threshold(tau=tau, target_fpr=target_fpr, measured_fpr=fpr, index_hash=str(scorer.index.manifest_hash),
                     n_calibration=n, n_heldout=int(held.size), bci=scorer.cfg.bci,
                     min_span=scorer.cfg.min_span, stderr=se, confidence=confidence, certified_fpr=certified,
                     settings=scorer.settings())


def split_heldout(items: Sequence[Any], heldout_fraction: float = 0.5, seed: int = 0) -> tuple[list, list]:
    """A deterministic (calibration, heldout) split of ``items``."""
    order = np.random.default_rng(seed).permutation(len(items))
    cut = int(round(len(items) * (1 - heldout_fraction)))
    return [items[i] for i in order[:cut]], [items[i] for i in order[cut:]]
