"""The Belief Conflict Index (BCI) of token spans, from a TraceIndex (host side, batched queries).

For a span s = (t_1, ..., t_m) that occurs c(s) >= 1 times in the indexed corpus:

  rarity(s)   = -sum_i log P_train(t_i)           nats; P_train = the index's add-0.5 unigram model
  density(s)  = rarity(s) / m                     nats per token
  conflict(s) = (sum_j r_j + a) / (n + 2a)        in (0, 1)
      r_j in [0, 1] is the policy risk of the document holding occurrence j (``unsafe`` -> 0/1, or
      ``risk``); the n occurrences are all of them when c(s) <= sample_size, else a deterministic
      sample of the suffix-array range; a = ``conflict_prior`` (a Beta(a, a) prior, so a span seen
      once in a violating document is not yet certain to be unsafe).
  BCI(s)      = conflict(s) x rarity(s)           (bci = "conflict_x_rarity", the default), or
  BCI(s)      = rarity(s) if c(s) <= max_support  (bci = "rarity", the TraceAlign paper's raw BCI;
                max_support = 0 means no limit; the paper kept matches with <= 3 occurrences and
                indexed only the policy-violating slice, i.e. build the index over that slice).
  c(s) = 0    -> rarity, conflict and BCI are 0: a span with no training-time source has no BCI.

Why the conflict factor: unigram rarity alone over-penalizes rare *benign* phrases (the paper's own
limitation); weighting by the share of support that comes from policy-violating documents keeps a
rare phrase from benign documents near zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from tracealign_jax.config import ProvenanceConfig


@dataclasses.dataclass(frozen=True)
class SpanScore:
    """BCI terms of one span. rarity/bci in nats, density in nats/token, conflict in [0, 1]."""

    tokens: tuple[int, ...]
    count: int
    rarity: float
    density: float
    conflict: float
    bci: float


@dataclasses.dataclass(frozen=True)
class ScoredSpan:
    """A maximal corpus span of a generation, ``tokens[start:end]`` (token offsets, end exclusive)."""

    start: int
    end: int
    count: int
    rarity: float
    density: float
    conflict: float
    bci: float


class BCIScorer:
    """Scores spans against ``index`` (a ``TraceIndex``) with the formulas of the module docstring."""

    def __init__(self, index: Any, cfg: ProvenanceConfig | None = None):
        self.index = index
        self.cfg = cfg or ProvenanceConfig()
        self.logp_V = np.asarray(index.unigram_logprobs(), dtype=np.float64)

    def rarity(self, tokens: np.ndarray) -> float:
        """-sum log P_train(t) over ``tokens`` (nats); out-of-vocabulary ids raise IndexError."""
        return float(-np.sum(self.logp_V[np.asarray(tokens, dtype=np.int64)]))

    def conflict_from_risks(self, risks: np.ndarray) -> float:
        a = self.cfg.conflict_prior
        return float((np.sum(risks) + a) / (risks.size + 2 * a))

    def score_spans(self, spans: Sequence[Sequence[int]]) -> list[SpanScore]:
        """Scores N spans with two batched index calls (occurrence sampling, then document risks)."""
        spans = [np.asarray(s, dtype=np.int64) for s in spans]
        if not spans:
            return []
        occ = self.index.occurrence_docs_batch(spans, self.cfg.sample_size)
        doc_lists = [np.asarray(d, dtype=np.int64) for d, _ in occ]
        flat = np.concatenate(doc_lists) if doc_lists else np.zeros(0, np.int64)
        risks_flat = np.asarray(self.index.doc_unsafe(flat), dtype=np.float64) if flat.size else np.zeros(0)
        bounds = np.cumsum([0] + [d.size for d in doc_lists])
        out = []
        for i, (span, (_, total)) in enumerate(zip(spans, occ)):
            out.append(self._score(span, int(total), risks_flat[bounds[i]:bounds[i + 1]]))
        return out

    def _score(self, span: np.ndarray, count: int, risks: np.ndarray) -> SpanScore:
        toks = tuple(int(t) for t in span)
        if count == 0 or span.size == 0:
            return SpanScore(toks, count, 0.0, 0.0, 0.0, 0.0)
        rarity = self.rarity(span)
        conflict = self.conflict_from_risks(risks)
        if self.cfg.bci == "rarity":
            ok = self.cfg.max_support <= 0 or count <= self.cfg.max_support
            bci = rarity if ok else 0.0
        else:
            bci = conflict * rarity
        return SpanScore(toks, count, rarity, rarity / span.size, conflict, bci)

    def scan(self, tokens: Sequence[int]) -> list[ScoredSpan]:
        """The maximal corpus spans (length >= ``min_span``) of one generation, scored."""
        return self.scan_batch([tokens])[0]

    def scan_batch(self, token_lists: Sequence[Sequence[int]]) -> list[list[ScoredSpan]]:
        """``scan`` for many generations, with the spans of all of them scored in one batch."""
        arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
        # One compiled call finds the maximal spans of every generation (all index shards at once).
        found = list(zip(arrays, self.index.maximal_spans_batch(arrays, min_len=self.cfg.min_span)))
        flat = [arr[s.start:s.end] for arr, spans in found for s in spans]
        scores = iter(self.score_spans(flat))
        out = []
        for _, spans in found:
            row = []
            for s in spans:
                sc = next(scores)
                row.append(ScoredSpan(int(s.start), int(s.end), sc.count, sc.rarity, sc.density, sc.conflict, sc.bci))
            out.append(row)
        return out

    def max_bci(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """float64[B]: the largest span BCI of each generation (0 when no span of min_span tokens matches)."""
        return np.array([max((s.bci for s in row), default=0.0) for row in self.scan_batch(token_lists)])
