"""The Belief Conflict Index (BCI) of token spans, from a TraceIndex (host side, batched queries).

For a span s = (t_1, ..., t_m) that occurs c(s) >= 1 times in the indexed corpus:

  rarity(s)      = -sum_i log P_train(t_i)        nats; P_train = the index's add-0.5 unigram model
  density(s)     = rarity(s) / m                  nats per token
  k, n           = sum of the policy risks r_j in [0, 1] of the documents holding the n sampled
                   occurrences (all of them when c(s) <= sample_size, else a deterministic stratified
                   sample of the suffix-array range)
  conflict(s)    = E[theta | k, n]                posterior mean of the violating share theta under the
                   prior Beta(alpha, beta) (``conflict_prior.py``: fitted to the corpus by empirical
                   Bayes when ``conflict_prior = 0``, else the symmetric Beta(a, a))
  p_violating(s) = P(theta > 1/2 | k, n)          how sure the support is that s is mostly violating text

  BCI(s) = rarity(s) x conflict(s) if p_violating(s) > min_posterior else 0   (bci = "evidence", default)
  BCI(s) = rarity(s) x conflict(s)                                           (bci = "conflict_x_rarity")
  BCI(s) = rarity(s) if c(s) <= max_support (0 = no limit) else 0            (bci = "rarity": the
           TraceAlign paper's raw BCI; the paper indexed only the violating slice and kept <= 3 matches)
  c(s) = 0 -> every term is 0: a span with no training-time source has no BCI.

Why "evidence" is the default. Unigram rarity alone refuses rare *benign* phrases as readily as unsafe
ones (the paper's own limitation). A conflict factor fixes that only if it needs evidence: text that
is rare and only in compliant documents, or shared boilerplate whose support is mostly compliant, must
score 0 however many nats it carries; text that is rare and mostly in violating documents keeps its
rarity, scaled by how violating its support is. ``evaluate.py`` measures each mode on generated
corpora (``tracealign bci evaluate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.conflict_prior import ConflictPrior, fit_conflict_prior, fixed_prior


@dataclasses.dataclass(frozen=True)
class SpanScore:
    """BCI terms of one span. rarity/bci in nats, density in nats/token, conflict and p_violating in [0, 1]."""

    tokens: tuple[int, ...]
    count: int
    rarity: float
    density: float
    conflict: float
    bci: float
    p_violating: float = 0.0


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
    p_violating: float = 0.0


# evidence mode: gate-failing spans seen at most this often are also scored without up to TRIM tokens per edge
TRIM, TRIM_MAX_COUNT = 2, 3


class BCIScorer:
    """Scores spans against ``index`` (a ``TraceIndex``) with the formulas of the module docstring.

    ``prior``: the conflict prior (fitted on construction when ``cfg.conflict_prior == 0``)."""

    def __init__(self, index: Any, cfg: ProvenanceConfig | None = None, prior: ConflictPrior | None = None):
        self.index = index
        self.cfg = cfg or ProvenanceConfig()
        self.logp_V = np.asarray(index.unigram_logprobs(), dtype=np.float64)
        if prior is None:
            c = self.cfg
            prior = (fixed_prior(c.conflict_prior) if c.conflict_prior > 0 else
                     fit_conflict_prior(index, span_len=c.max_span, min_len=c.min_span, sample_size=c.sample_size))
        self.prior = prior

    def settings(self) -> dict[str, Any]:
        """Everything that changes this scorer's numbers: the config fields BCI reads, and the prior.

        Saved with every artifact built from BCIs (threshold, token arrays, veto table) and compared on
        load (``check_settings``)."""
        c = self.cfg
        return {"bci": c.bci, "conflict_prior": c.conflict_prior, "min_posterior": c.min_posterior,
                "max_support": c.max_support, "sample_size": c.sample_size, "min_span": c.min_span,
                "prior_alpha": round(self.prior.alpha, 9), "prior_beta": round(self.prior.beta, 9)}

    def rarity(self, tokens: np.ndarray) -> float:
        """-sum log P_train(t) over ``tokens`` (nats); out-of-vocabulary ids raise IndexError."""
        return float(-np.sum(self.logp_V[np.asarray(tokens, dtype=np.int64)]))

    def _combine(self, count: np.ndarray, rarity: np.ndarray, risk_sum: np.ndarray, n_docs: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(conflict, p_violating, bci) float64[N] from the span statistics, by ``cfg.bci``."""
        conflict, p_violating = self.prior.posterior(risk_sum, n_docs)
        if self.cfg.bci == "rarity":
            ok = count <= self.cfg.max_support if self.cfg.max_support > 0 else np.ones(count.shape, bool)
            bci = np.where(ok, rarity, 0.0)
        elif self.cfg.bci == "evidence":
            bci = np.where(p_violating > self.cfg.min_posterior, conflict * rarity, 0.0)
        else:
            bci = conflict * rarity
        return conflict, p_violating, bci

    def score_spans(self, spans: Sequence[Sequence[int]]) -> list[SpanScore]:
        """Scores N spans with two batched index calls (occurrence sampling, then document risks)."""
        spans = [np.asarray(s, dtype=np.int64).reshape(-1) for s in spans]
        terms = self.score_arrays(spans)
        names = ("count", "rarity", "density", "conflict", "bci", "p_violating")
        return [SpanScore(tuple(s.tolist()), int(c), float(r), float(d), float(f), float(b), float(p))
                for s, c, r, d, f, b, p in zip(spans, *(terms[k] for k in names))]

    def score_arrays(self, spans: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Vectorized BCI terms of N spans: ``count`` int64[N]; ``rarity``, ``density``, ``conflict``,
        ``p_violating``, ``bci`` float64[N] (the module docstring's formulas; all 0 where count is 0)."""
        n = len(spans)
        if n == 0:
            z = np.zeros(0)
            return {"count": z.astype(np.int64), "rarity": z, "density": z, "conflict": z, "bci": z, "p_violating": z}
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
        conflict, p_violating, bci = self._combine(count, rarity, risk_sum, n_docs)
        rarity, conflict, p_violating, bci = (np.where(found, x, 0.0) for x in (rarity, conflict, p_violating, bci))
        density = np.where(found, rarity / np.maximum(lengths, 1), 0.0)
        return {"count": count, "rarity": rarity, "density": density, "conflict": conflict, "bci": bci,
                "p_violating": p_violating}

    def score_counted(self, span: np.ndarray, count: int, risks: np.ndarray) -> SpanScore:
        """One span from its count and sampled occurrence risks (the un-batched reference path)."""
        toks = tuple(int(t) for t in span)
        if count == 0 or span.size == 0:
            return SpanScore(toks, count, 0.0, 0.0, 0.0, 0.0)
        rarity = self.rarity(span)
        risks = np.asarray(risks, np.float64)
        conflict, p_violating, bci = self._combine(np.array([count]), np.array([rarity]), np.array([risks.sum()]),
                                                   np.array([risks.size]))
        return SpanScore(toks, count, rarity, rarity / span.size, float(conflict[0]), float(bci[0]),
                         float(p_violating[0]))

    def scan(self, tokens: Sequence[int]) -> list[ScoredSpan]:
        """The maximal corpus spans (length >= ``min_span``) of one generation, scored."""
        return self.scan_batch([tokens])[0]

    def scan_batch(self, token_lists: Sequence[Sequence[int]]) -> list[list[ScoredSpan]]:
        """``scan`` for many generations, with the spans of all of them scored in one batch.

        One compiled call gives the longest corpus match at every position of every generation; a
        span ``[i, i + longest[i])`` is maximal iff it ends beyond every earlier one (``i + longest``
        never decreases by more than the step). Counts come with the occurrence sampling.

        Evidence mode also scores edge-trimmed cores. A maximal span can run one or two tokens past a
        violating passage into a coincidental match with one compliant document; its support is then
        that document alone and the gate closes on text that is violating without those tokens. So a
        span that fails the gate with at most ``TRIM_MAX_COUNT`` occurrences is replaced by its best
        core ``[a + i, b - j)``, i, j <= ``TRIM``, when one scores higher (all cores in one batch).
        """
        arrays = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
        longest = self.index.longest_matches_batch(arrays) if arrays else []
        bounds = [maximal_span_bounds(np.asarray(ln, np.int64), self.cfg.min_span) for ln in longest]
        spans = [(r, a, b) for r, (st, en) in enumerate(bounds) for a, b in zip(st.tolist(), en.tolist())]
        names = ("count", "rarity", "density", "conflict", "bci", "p_violating")
        t = self.score_arrays([arrays[r][a:b] for r, a, b in spans])
        rows = [list(x) for x in zip(*(t[k].tolist() for k in names))]
        if self.cfg.bci == "evidence":
            self._trim_cores(arrays, spans, rows, t)
        out: list[list[ScoredSpan]] = [[] for _ in arrays]
        for (r, a, b), row in zip(spans, rows):
            a, b = row.pop() if len(row) > len(names) else (a, b)
            out[r].append(ScoredSpan(a, b, *row))
        return out

    def needs_cores(self, bci: float, count: int) -> bool:
        """Whether a maximal span with this score is also scored by its cores (``scan_batch``)."""
        return self.cfg.bci == "evidence" and bci <= 0 and 0 < count <= TRIM_MAX_COUNT

    def cores(self, a: int, b: int) -> list[tuple[int, int]]:
        """The edge-trimmed cores ``[a + i, b - j)`` of a span, i, j <= TRIM, at least min_span long."""
        m = max(self.cfg.min_span, 1)
        return [(a + i, b - j) for i in range(TRIM + 1) for j in range(TRIM + 1) if (i or j) and b - j - a - i >= m]

    def _trim_cores(self, arrays: list[np.ndarray], spans: list[tuple[int, int, int]], rows: list[list],
                    t: dict[str, np.ndarray]) -> None:
        """In place: rows of gate-failing rare spans take their best-scoring core (``scan_batch``)."""
        cand, owner = [], []
        for i, (r, a, b) in enumerate(spans):
            if self.needs_cores(t["bci"][i], t["count"][i]):
                for core in self.cores(a, b):
                    cand.append(core)
                    owner.append(i)
        if not cand:
            return
        c = self.score_arrays([arrays[spans[i][0]][a:b] for i, (a, b) in zip(owner, cand)])
        for j, i in enumerate(owner):
            if c["bci"][j] > rows[i][4]:
                rows[i][:6] = [c[k][j].item() for k in ("count", "rarity", "density", "conflict", "bci", "p_violating")]
                rows[i][6:] = [cand[j]]

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
