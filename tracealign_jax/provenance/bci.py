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
        spans = [np.asarray(s, dtype=np.int64).reshape(-1) for s in spans]
        terms = self.score_arrays(spans)
        return [SpanScore(tuple(s.tolist()), int(c), float(r), float(d), float(f), float(b))
                for s, c, r, d, f, b in zip(spans, *(terms[k] for k in ("count", "rarity", "density", "conflict", "bci")))]

    def score_arrays(self, spans: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Vectorized BCI terms of N spans: ``count`` int64[N]; ``rarity``, ``density``, ``conflict``,
        ``bci`` float64[N] (the formulas of the module docstring; all 0 where count is 0)."""
        n = len(spans)
        if n == 0:
            z = np.zeros(0)
            return {"count": z.astype(np.int64), "rarity": z, "density": z, "conflict": z, "bci": z}
        lengths = np.fromiter((s.size for s in spans), np.int64, count=n)
        flat = np.concatenate(spans)
        occ = self.index.occurrence_docs_batch(spans, self.cfg.sample_size)
        count = np.fromiter((t for _, t in occ), np.int64, count=n)
        n_docs = np.fromiter((d.size for d, _ in occ), np.int64, count=n)
        docs = np.concatenate([d for d, _ in occ]).astype(np.int64)
        risks = np.asarray(self.index.doc_unsafe(docs), np.float64) if docs.size else np.zeros(0)
        found = (count > 0) & (lengths > 0)
        # -log P over every token (clipped ids only matter where count == 0, which scores 0 anyway)
        neg = -self.logp_V[np.clip(flat, 0, self.logp_V.size - 1)]
        rarity = _segment_sums(neg, lengths)
        risk_sum = _segment_sums(risks, n_docs)
        a = self.cfg.conflict_prior
        conflict = (risk_sum + a) / (n_docs + 2 * a)
        if self.cfg.bci == "rarity":
            ok = count <= self.cfg.max_support if self.cfg.max_support > 0 else np.ones(n, bool)
            bci = np.where(ok, rarity, 0.0)
        else:
            bci = conflict * rarity
        rarity, conflict, bci = (np.where(found, x, 0.0) for x in (rarity, conflict, bci))
        density = np.where(found, rarity / np.maximum(lengths, 1), 0.0)
        return {"count": count, "rarity": rarity, "density": density, "conflict": conflict, "bci": bci}

    def score_counted(self, span: np.ndarray, count: int, risks: np.ndarray) -> SpanScore:
        """One span from its count and sampled occurrence risks (the un-batched reference path)."""
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
        """``scan`` for many generations, with the spans of all of them scored in one batch.

        One compiled call gives the longest corpus match at every position of every generation; a
        span ``[i, i + longest[i])`` is maximal iff it ends beyond every earlier one (``i + longest``
        never decreases by more than the step). Counts come with the occurrence sampling.
        """
        arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
        longest = self.index.longest_matches_batch(arrays) if arrays else []
        bounds = [maximal_span_bounds(np.asarray(ln, np.int64), self.cfg.min_span) for ln in longest]
        flat = [arr[a:b] for arr, (st, en) in zip(arrays, bounds) for a, b in zip(st.tolist(), en.tolist())]
        t = self.score_arrays(flat)
        cols = zip(t["count"].tolist(), t["rarity"].tolist(), t["density"].tolist(), t["conflict"].tolist(),
                   t["bci"].tolist())
        return [[ScoredSpan(a, b, *next(cols)) for a, b in zip(st.tolist(), en.tolist())] for st, en in bounds]

    def max_bci(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """float64[B]: the largest span BCI of each generation (0 when no span of min_span tokens matches)."""
        return np.array([max((s.bci for s in row), default=0.0) for row in self.scan_batch(token_lists)])


def _segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments of ``values`` with the given lengths (empty segments sum to 0)."""
    out = np.zeros(lengths.size, np.float64)
    nonempty = lengths > 0
    if values.size and nonempty.any():
        starts = (np.cumsum(lengths) - lengths)[nonempty]
        out[nonempty] = np.add.reduceat(values.astype(np.float64), starts)
    return out


def maximal_span_bounds(longest_L: np.ndarray, min_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the maximal matching spans of length >= min_len, from longest matches int[L]."""
    ends = np.arange(longest_L.size) + longest_L
    reach = np.maximum.accumulate(np.concatenate([[-1], ends[:-1]])) if ends.size else ends
    keep = (longest_L > 0) & (ends > reach) & (longest_L >= max(min_len, 1))
    starts = np.flatnonzero(keep)
    return starts, starts + longest_L[starts]
