"""TRACE training data: the category and impact weight of every tokenized pair, from its source record.

``loss.type: trace`` trains through ``training.loop.train`` (LoRA adapters, the one step, checkpoint
and metrics path) on ``realign impact``'s output (or ``realign triage``'s: weights then default to 1
on every conflict, i.e. TRACE without impact weighting), read through ``training.data`` like DPO
pairs; each record's ``category`` and ``weight_mean1`` are matched to its tokenized pair by line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tracealign_jax.realign.triage import CODES, RETAIN
from tracealign_jax.records import RecordError, iter_records


def pair_fields(path: str | Path, lines_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(category int32[N], weight float32[N]) of the tokenized pairs, from their source records by line.

    ``category`` is required (retain | invert | suppress); ``weight_mean1`` defaults to 1 on conflicts.
    """
    by_line: dict[int, tuple[int, float]] = {}
    for line, rec in iter_records(path):
        name = rec.get("category")
        if name not in CODES:
            raise RecordError(path, line, "category", f"{name!r} is not one of {sorted(CODES)} (run `tracealign realign triage`)")
        w = rec.get("weight_mean1", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise RecordError(path, line, "weight_mean1", f"expected a number >= 0, got {w!r}")
        by_line[line] = (CODES[name], float(w) if CODES[name] != RETAIN else 0.0)
    got = [by_line[int(x)] for x in lines_N]
    return np.asarray([c for c, _ in got], np.int32), np.asarray([w for _, w in got], np.float32)
