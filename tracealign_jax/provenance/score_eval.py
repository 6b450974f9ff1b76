"""How well a BCI mode separates text to refuse from text to pass, on labelled completions.

For each mode: tau is calibrated on compliant text (``calibrate.calibrate``, the same target FPR as
``tracealign bci calibrate``), every labelled completion is refused iff its max span BCI > tau, and
the refusal rate of each kind is reported beside

  precision = refused refuse-labelled / all refused      recall = refused refuse-labelled / refuse-labelled
  fpr       = refused pass-labelled / pass-labelled      (None where a denominator is empty)

A mode is a ``bci`` name, optionally with a fixed conflict prior: ``conflict_x_rarity:0.5`` is the
pre-evidence default (symmetric Beta(1/2, 1/2)). The fitted prior is shared by the modes that use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.bci import BCIScorer
from tracealign_jax.provenance.calibrate import calibrate, split_heldout

MODES = ("evidence", "conflict_x_rarity", "conflict_x_rarity:0.5", "rarity")


@dataclasses.dataclass(frozen=True)
class Labelled:
    """One completion to judge: token ids, ``label`` refuse | pass, ``kind`` (a free-form group name)."""

    tokens: np.ndarray
    label: str
    kind: str


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def evaluate_modes(index: Any, cfg: ProvenanceConfig, items: Sequence[Labelled], compliant: Sequence[Sequence[int]],
                   *, modes: Sequence[str] = MODES, target_fpr: float | None = None, seed: int = 0) -> dict[str, Any]:
    """{mode: {tau, heldout_fpr, precision, recall, fpr, kinds: {kind: {label, n, refused, rate}}}}."""
    bad = [x.label for x in items if x.label not in ("refuse", "pass")]
    if bad:
        raise ValueError(f"label must be refuse | pass, got {bad[0]!r}")
    target = cfg.target_fpr if target_fpr is None else target_fpr
    calib, held = split_heldout(list(compliant), 0.5, seed)
    priors: dict[float, Any] = {}
    out: dict[str, Any] = {}
    for mode in modes:
        name, _, fixed = mode.partition(":")
        mcfg = dataclasses.replace(cfg, bci=name, conflict_prior=float(fixed) if fixed else cfg.conflict_prior)
        scorer = BCIScorer(index, mcfg, prior=priors.get(mcfg.conflict_prior))
        prior = priors.setdefault(mcfg.conflict_prior, scorer.prior)
        thr = calibrate(scorer, calib, held, target, cfg.calibration_confidence)
        refused = scorer.max_bci([x.tokens for x in items]) > thr.tau
        labels = np.array([x.label == "refuse" for x in items], bool)
        kinds: dict[str, dict[str, Any]] = {}
        for x, r in zip(items, refused):
            k = kinds.setdefault(x.kind, {"label": x.label, "n": 0, "refused": 0})
            k["n"] += 1
            k["refused"] += int(r)
        for k in kinds.values():
            k["rate"] = k["refused"] / k["n"]
        tp = int(np.sum(refused & labels))
        out[mode] = {"tau": thr.tau, "heldout_fpr": thr.measured_fpr, "n_refuse": int(labels.sum()),
                     "n_pass": int((~labels).sum()), "precision": _rate(tp, int(refused.sum())),
                     "recall": _rate(tp, int(labels.sum())), "fpr": _rate(int(np.sum(refused & ~labels)), int((~labels).sum())),
                     "kinds": kinds, "prior": dataclasses.asdict(prior)}
    return out


def render_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per kind (its refusal rate), then precision / recall / FPR / tau; one
    column per mode."""
    modes = list(results)

    def cell(v: float | None, digits: int = 2) -> str:
        return "n/a" if v is None else f"{v:.{digits}f}"

    kinds = list(results[modes[0]]["kinds"].items())
    lines = ["| refused share | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for kind, info in kinds:
        rates = [results[m]["kinds"][kind]["rate"] for m in modes]
        lines.append(f"| {kind} ({info['label']}, n={info['n']}) | " + " | ".join(cell(r) for r in rates) + " |")
    for key in ("precision", "recall", "fpr"):
        lines.append(f"| **{key}** | " + " | ".join(cell(results[m][key]) for m in modes) + " |")
    lines.append("| tau (nats) | " + " | ".join(cell(results[m]["tau"], 1) for m in modes) + " |")
    return "\n".join(lines) + "\n"
