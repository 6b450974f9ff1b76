"""Building the veto table from an index: collect the high-BCI spans of policy-violating documents.

Every window of length n_min..n_max (``ProvenanceConfig.min_span`` / ``max_span``) of every document
with risk >= ``min_risk`` is a candidate; duplicates are removed, candidates are scored in batches
(``BCIScorer.score_spans``: one batched occurrence-sampling call per batch) and those with
BCI > tau are compiled by ``veto.store.compile_veto_table`` into contexts k = 1..n_max-1 -> next
tokens + penalties (nats), at most ``max_entries`` per context.

Entry penalties (``ProvenanceConfig.veto_weighting``). A span's first tokens are often boilerplate that
benign documents share ("### Request: How do I ..."); giving the entry ``(s_1..s_k) -> s_{k+1}`` the
whole span's BCI would veto that boilerplate wherever it appears. With ``conflict`` (the default) the
entry's penalty is ``conflict(s_1..s_{k+1}) x BCI(s)``: the BCI the continuation is expected to lead
to, with conflict the Beta-smoothed share of the prefix's corpus occurrences that sit in violating
documents (``BCIScorer``'s definition). Entries whose prefix fails BCI's evidence test (bci =
evidence: P(violating share > 1/2) > ``min_posterior``; other modes: conflict > ``veto_min_conflict``),
or whose expected BCI is not above tau, are dropped: a continuation is vetoed only where the corpus
says it mostly leads into policy-violating text.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm import tqdm

from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.multihost import allgather_rows, process_slice
from tracealign_jax.veto.store import compile_veto_table
from tracealign_jax.veto.table import VetoTable


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
    """High-BCI spans of violating documents: ``(tokens_NxL int64, lengths_N int64, bci_N float32)``.

    Every process enumerates the candidates (cheap, deterministic) and scores its slice of them; the
    kept spans of all processes are gathered in candidate order, so each process returns the same."""
    tokens, lengths = candidate_windows(index, cfg.min_span, cfg.max_span, min_risk, max_docs)
    mine = process_slice(len(lengths))
    keep_t, keep_l, keep_b = [tokens[:0]], [lengths[:0]], [np.zeros(0, np.float32)]
    for s in tqdm(range(mine.start, mine.stop, batch), desc="scoring veto spans", disable=not progress):
        tb, lb = tokens[s:min(s + batch, mine.stop)], lengths[s:min(s + batch, mine.stop)]
        scores = scorer.score_spans([t[:n] for t, n in zip(tb, lb)])
        bci = np.array([sc.bci for sc in scores], np.float32)
        hit = bci > tau
        keep_t.append(tb[hit])
        keep_l.append(lb[hit])
        keep_b.append(bci[hit])
    return tuple(allgather_rows(np.concatenate(k)) for k in (keep_t, keep_l, keep_b))  # type: ignore[return-value]


def prefix_weights(scorer: Any, cfg: ProvenanceConfig, tokens_NxL: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
    """float64[N, L]: column k (1 <= k < length) is the conflict of the prefix ``tokens[i, :k+1]`` (the
    prefix entry k completes) where that prefix passes the scorer's evidence test, else 0; other columns
    0. The test is BCI's own: P(violating share > 1/2) > ``min_posterior`` (bci = evidence), else
    conflict > ``veto_min_conflict``. Each distinct prefix is scored once, by one process (its slice)."""
    n, width = tokens_NxL.shape
    out = np.zeros((n, width), np.float64)
    for k in range(1, width):
        rows = np.flatnonzero(lengths_N > k)
        if rows.size == 0:
            continue
        uniq, inverse = np.unique(tokens_NxL[rows, :k + 1], axis=0, return_inverse=True)
        terms = scorer.score_arrays(list(uniq[process_slice(len(uniq))]))
        test = "p_violating" if cfg.bci == "evidence" else "conflict"
        passed = allgather_rows(np.asarray(terms[test], np.float64)) > (
            cfg.min_posterior if cfg.bci == "evidence" else cfg.veto_min_conflict)
        conflict = allgather_rows(np.asarray(terms["conflict"], np.float64))
        out[rows, k] = np.where(passed, conflict, 0.0)[inverse.reshape(-1)]
    return out


def build_veto_table(index: Any, scorer: Any, cfg: ProvenanceConfig, tau: float, *, min_risk: float = 0.5,
                     max_docs: int = 0, progress: bool = True) -> tuple[VetoTable, dict]:
    """The veto table of ``index`` at threshold ``tau`` (nats) + build statistics (meta for saving)."""
    tokens, lengths, bci = collect_high_bci_spans(index, scorer, cfg, tau, min_risk=min_risk, max_docs=max_docs,
                                                  progress=progress)
    weights = None
    if cfg.veto_weighting == "conflict":
        weights = prefix_weights(scorer, cfg, tokens, lengths)
    table = compile_veto_table((np.where(tokens < 0, 0, tokens), lengths, bci), max_span=cfg.max_span,
                               max_entries=cfg.max_entries, entry_weights_NxL=weights,
                               min_penalty=tau if weights is not None else 0.0)
    meta = {
        "index_hash": str(index.manifest_hash), "tau": float(tau), "num_spans": int(lengths.size),
        "n_min": cfg.min_span, "n_max": cfg.max_span, "max_entries": cfg.max_entries, "bci": cfg.bci,
        "bci_settings": scorer.settings(),
        "veto_weighting": cfg.veto_weighting, "veto_min_conflict": cfg.veto_min_conflict,
        "num_contexts": table.num_contexts, "num_entries": table.num_entries,
    }
    return table, meta
