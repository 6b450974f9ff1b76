"""Triage of preference pairs (x, y_w, y_l) against a new policy, from a judge's compliance labels.

TRACE's rule (arXiv 2511.02623):
  y_w compliant                          -> RETAIN   (whatever y_l is: the stored preference is still fine)
  y_w non-compliant and y_l compliant    -> INVERT   (the policy now prefers y_l: train on the flipped pair)
  y_w non-compliant and y_l non-compliant -> SUPPRESS (neither response is allowed: unlearn both)
Host-side, no JAX: the codes are the int32 values the jitted objective reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

RETAIN, INVERT, SUPPRESS = 0, 1, 2
NAMES = {RETAIN: "retain", INVERT: "invert", SUPPRESS: "suppress"}
CODES = {v: k for k, v in NAMES.items()}


def triage_codes(chosen_ok_N: np.ndarray, rejected_ok_N: np.ndarray) -> np.ndarray:
    """int32[N] categories from the compliance of y_w (``chosen_ok_N``) and y_l (``rejected_ok_N``), bool[N]."""
    w = np.asarray(chosen_ok_N, bool)
    l_ = np.asarray(rejected_ok_N, bool)
    if w.shape != l_.shape:
        raise ValueError(f"label arrays differ in shape: {w.shape} vs {l_.shape}")
    return np.where(w, RETAIN, np.where(l_, INVERT, SUPPRESS)).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TriagedPair:
    """One pair with its category and the judge's evidence for each response."""

    index: int
    category: str
    chosen_compliant: bool
    rejected_compliant: bool
    chosen_evidence: str
    rejected_evidence: str
    chosen_rule: str
    rejected_rule: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def triage_pairs(prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], judge: Any) -> list[TriagedPair]:
    """Labels both responses of every pair with ``judge`` (one batched call) and triages them.

    judge: anything with ``label_batch(prompts, responses) -> list[Label]`` (``realign.judge``).
    """
    n = len(prompts)
    if not len(chosen) == len(rejected) == n:
        raise ValueError(f"{n} prompts, {len(chosen)} chosen, {len(rejected)} rejected responses")
    labels = judge.label_batch(list(prompts) * 2, list(chosen) + list(rejected))
    lw, ll = labels[:n], labels[n:]
    codes = triage_codes(np.array([x.compliant for x in lw], bool), np.array([x.compliant for x in ll], bool))
    return [TriagedPair(i, NAMES[int(codes[i])], lw[i].compliant, ll[i].compliant, lw[i].evidence, ll[i].evidence,
                        lw[i].rule, ll[i].rule) for i in range(n)]  # fmt: skip


def summarize(triaged: Sequence[TriagedPair], examples: int = 3) -> dict[str, Any]:
    """Counts per category, counts per (category, rule that fired) and the first ``examples`` indices."""
    out: dict[str, Any] = {"total": len(triaged), "counts": {name: 0 for name in CODES}, "by_rule": {}, "examples": {}}
    for t in triaged:
        out["counts"][t.category] += 1
        if t.category != "retain":
            rule = t.chosen_rule or "?"
            out["by_rule"].setdefault(t.category, {}).setdefault(rule, 0)
            out["by_rule"][t.category][rule] += 1
        ex = out["examples"].setdefault(t.category, [])
        if len(ex) < examples:
            ex.append(t.index)
    return out
