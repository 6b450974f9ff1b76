"""Building the veto table from an index: collect the high-BCI spans of policy-violating documents.

Every window of length n_min..n_max (``ProvenanceConfig.min_span`` / ``max_span``) of every document
with risk >= ``min_risk`` is a candidate; duplicates are removed, candidates are scored in batches
(``BCIScorer.score_spans``: one batched occurrence-sampling call per batch) and those with
BCI > tau are compiled by ``veto_table.compile_veto_table`` into contexts k = 1..n_max-1 -> next
tokens + penalties (BCI, nats), at most ``max_entries`` per context.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.veto_table import VetoTable, compile_veto_table


def candidate_windows(index: Any, n_min: int, n_max: int, min_risk: float = 0.5,
                      max_docs: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unique windows of violating documents: ``(tokens_NxL int64 padded with -1, lengths_N int64)``."""
    rows, lens = [], []
    for i, (_, doc) in enumerate(index.iter_doc_tokens(unsafe_only=True, min_risk=min_risk)):
        if max_docs and i >= max_docs:
            break
        doc = np.asarray(doc, np.int64)
        for n in range(n_min, min(n_max, doc.size) + 1):
            win = np.lib.stride_tricks.sliding_window_view(doc, n)
            padded = np.full((win.shape[0], n_max), -1, np.int64)
            padded[:, :n] = win
            rows.append(padded)
            lens.append(np.full(win.shape[0], n, np.int64))
    if not rows:
        return np.zeros((0, n_max), np.int64), np.zeros(0, np.int64)
    tokens, lengths = np.concatenate(rows), np.concatenate(lens)
    tokens, first = np.unique(tokens, axis=0, return_index=True)
    return tokens, lengths[first]


def collect_high_bci_spans(index: Any, scorer: Any, cfg: ProvenanceConfig, tau: float, *, min_risk: float = 0.5,
                           batch: int = 8192, max_docs: int = 0,
                           progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """High-BCI spans of violating documents: ``(tokens_NxL int64, lengths_N int64, bci_N float32)``."""
    tokens, lengths = candidate_windows(index, cfg.min_span, cfg.max_span, min_risk, max_docs)
    keep_t, keep_l, keep_b = [], [], []
    for s in tqdm(range(0, len(lengths), batch), desc="scoring veto spans", disable=not progress):
        tb, lb = tokens[s:s + batch], lengths[s:s + batch]
        scores = scorer.score_spans([t[:n] for t, n in zip(tb, lb)])
        bci = np.array([sc.bci for sc in scores], np.float32)
        hit = bci > tau
        keep_t.append(tb[hit])
        keep_l.append(lb[hit])
        keep_b.append(bci[hit])
    if not keep_t:
        return tokens[:0], lengths[:0], np.zeros(0, np.float32)
    return np.concatenate(keep_t), np.concatenate(keep_l), np.concatenate(keep_b)


def build_veto_table(index: Any, scorer: Any, cfg: ProvenanceConfig, tau: float, *, min_risk: float = 0.5,
                     max_docs: int = 0, progress: bool = True) -> tuple[VetoTable, dict]:
    """The veto table of ``index`` at threshold ``tau`` (nats) + build statistics (meta for saving)."""
    tokens, lengths, bci = collect_high_bci_spans(index, scorer, cfg, tau, min_risk=min_risk, max_docs=max_docs,
                                                  progress=progress)
    table = compile_veto_table((np.where(tokens < 0, 0, tokens), lengths, bci), max_span=cfg.max_span,
                               max_entries=cfg.max_entries)
    meta = {
        "index_hash": str(index.manifest_hash), "tau": float(tau), "num_spans": int(lengths.size),
        "n_min": cfg.min_span, "n_max": cfg.max_span, "max_entries": cfg.max_entries, "bci": cfg.bci,
        "num_contexts": table.num_contexts, "num_entries": table.num_entries,
    }
    return table, meta
