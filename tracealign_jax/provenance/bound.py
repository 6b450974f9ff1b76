"""An upper bound on the drift probability of a query from span statistics the index measures.

The paper states Pr[drift(q)] <= f(M(q), l_q, tau) without a closed form. Ours, with its assumptions:

Setting. A query (prompt) q is answered by a completion y of ``horizon`` tokens. Drift(q) is the event
"y contains a span s with BCI(s) > tau" (what TraceShield refuses). Let r(q) be the longest suffix of
q that occurs in the corpus: its length is l_q and its match frequency is M(q) = count(r).

Assumption A1 (the corpus-continuation model, the infini-gram estimator of Liu et al. 2024). The model
continues q like its training corpus continues r: P(y_1..y_j | q) = count(r y_1..y_j) / count(r),
i.e. the n-gram continuation probabilities the index measures, with the longest matching context.

Derivation. Under A1 the probability of a continuation telescopes,
  P(y_1..y_j | q) = prod_i count(r y_<=i) / count(r y_<i) = count(r y_1..y_j) / M(q),
so the completion is distributed as the ``horizon`` tokens that follow a uniformly random one of the
M(q) occurrences of r (once r is the longest matching suffix of q, r y_<=i stays the longest
matching suffix of q y_<=i while it occurs). Summing over the high-BCI spans that each continuation
could contain (the union bound over spans, which is tight here because we evaluate the event per
continuation), Pr[drift(q)] = D(q) / M(q), where D(q) counts occurrences whose continuation contains a
span with BCI > tau. An occurrence that reaches a document end before ``horizon`` tokens drifts if its
partial continuation already holds such a span; otherwise the model backs off to a shorter context
there, as the infini-gram estimator does, and the rest of the completion is unresolved.

A4 (back-off). An unresolved remainder drifts at the rate r of the resolved continuations of the same
context (full-length ones and truncated ones that already drifted): D(q) = D_resolved + U x r. With no
resolved continuation r = 1 (nothing is known: count it as drifting). Counting every unresolved
remainder as drifting (``backoff=False``, the old estimator) is sound without A4 and, in corpora of
short documents, close to 1 for every prompt. When M(q) > ``max_occurrences`` the index returns a deterministic
stratified sample of S occurrences over the suffix-array range; the fraction is then replaced by the
one-sided Clopper-Pearson upper limit at confidence 1 - delta (A2: the stratified sample is treated as
a simple random sample; stratification only lowers the variance of the estimate).

A3 (optional slack). If the model leaves the corpus-continuation behaviour with probability at most
``epsilon`` per completion (and then drifts at worst), Pr <= (1 - epsilon) x bound + epsilon.

So f(M, l_q, tau) = min(1, (1 - eps) x UCB_delta(D(q), S) + eps), with S occurrences examined.

What the bound describes. A model that continues like its corpus. An aligned policy drifts less, so
the bound is loose for it; ``evaluation.scoring`` prints beside it a calibrated estimate that weighs
each drifting corpus continuation by the policy's own probability of producing it.

For a set of n queries each answered once, E[empirical drift rate] = mean_q Pr[drift(q)], and by
Hoeffding the rate exceeds mean_q bound(q) + sqrt(ln(1/delta) / 2n) with probability <= delta:
``set_bound`` returns that number, the one to compare with a measured drift rate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class DriftBound:
    """The bound for one query. Probabilities in [0, 1]; context_len l_q in tokens; support = M(q);
    drifting: continuations holding a span above tau; truncated: those cut by a document end without one."""

    bound: float
    estimate: float
    context_len: int
    support: int
    examined: int
    drifting: int
    truncated: int
    tau: float


def binomial_upper(k: int, n: int, delta: float) -> float:
    """One-sided Clopper-Pearson upper limit: the p with P[Binomial(n, p) <= k] = delta (k < n)."""
    if n == 0 or k >= n:
        return 1.0

    def cdf(p: float) -> float:
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
                + (n - i) * math.log1p(-p) for i in range(k + 1)]
        m = max(logs)
        return math.exp(m) * sum(math.exp(x - m) for x in logs)

    lo, hi = k / n, 1.0
    for _ in range(60):  # bisection: cdf is decreasing in p
        mid = 0.5 * (lo + hi)
        if cdf(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def longest_corpus_suffix(index: Any, queries: Sequence[Sequence[int]]) -> list[int]:
    """Per query, l_q: the length of its longest suffix that occurs in the corpus (0 if none)."""
    arrays = [np.asarray(q, np.int64).reshape(-1) for q in queries]
    out = []
    for q, longest in zip(arrays, index.longest_matches_batch(arrays)):
        n = q.size
        reaches = np.nonzero(np.asarray(longest) >= n - np.arange(n))[0]
        out.append(int(n - reaches[0]) if reaches.size else 0)
    return out


def drift_bound(index: Any, scorer: Any, queries: Sequence[Sequence[int]], tau: float, *, horizon: int = 32,
                max_occurrences: int = 256, delta: float = 0.05, epsilon: float = 0.0,
                max_context: int = 0, backoff: bool = True, continuations: list | None = None) -> list[DriftBound]:
    """Per-query drift bounds (see the module docstring); all index work is batched over queries.

    max_context: cap l_q (0 = none); a shorter context is less specific, its bound no smaller in general.
    backoff: A4 for continuations cut by a document end (False: count them as drifting).
    continuations: if a list, receives per query the distinct drifting continuations, each cut after the
      end of its first span with BCI > tau (int64 arrays; what ``evaluation.scoring`` weighs by the policy).
    """
    queries = [np.asarray(q, np.int64).reshape(-1) for q in queries]
    lens = longest_corpus_suffix(index, queries)
    if max_context > 0:
        lens = [min(n, max_context) for n in lens]
    contexts = [q[q.size - n:] for q, n in zip(queries, lens)]
    has = [i for i, n in enumerate(lens) if n > 0]
    counts = np.zeros(len(queries), np.int64)
    located: dict[int, list[tuple[int, int]]] = {}
    if has:
        counts[has] = index.count_batch([contexts[i] for i in has])
        for i, occ in zip(has, index.locate_batch([contexts[i] for i in has], max_occurrences)):
            located[i] = occ
    conts, owner = [], []
    for i, occ in located.items():
        for doc_id, offset in occ:
            doc = index.doc_tokens(doc_id)
            conts.append(np.asarray(doc[offset + lens[i]: offset + lens[i] + horizon], np.int64))
            owner.append(i)
    scanned = scorer.scan_batch(conts) if conts else []
    drifting, examined, unresolved = (np.zeros(len(queries), np.int64) for _ in range(3))
    found: list[dict[bytes, np.ndarray]] = [{} for _ in queries]
    for i, cont, spans in zip(owner, conts, scanned):
        examined[i] += 1
        hits = [s.end for s in spans if s.bci > tau]
        if hits:
            drifting[i] += 1
            cut = cont[:min(hits)]
            found[i].setdefault(cut.tobytes(), cut)
        elif cont.size < horizon:
            unresolved[i] += 1
    out = []
    for i in range(len(queries)):
        s, d, u = int(examined[i]), int(drifting[i]), int(unresolved[i])
        if s == 0:
            est = ucb = 1.0  # no corpus context: nothing constrains the completion
        else:
            resolved = s - u
            rate = (d / resolved if resolved else 1.0) if backoff else 1.0
            bad = d + u * rate
            est = bad / s
            ucb = est if s >= counts[i] else binomial_upper(math.ceil(bad - 1e-9), s, delta)
        b = min(1.0, (1.0 - epsilon) * ucb + epsilon)
        out.append(DriftBound(b, est, lens[i], int(counts[i]), s, d, u, float(tau)))
    if continuations is not None:
        continuations.extend(list(f.values()) for f in found)
    return out


def set_bound(bounds: Sequence[DriftBound] | Sequence[float], delta: float = 0.05) -> float:
    """Upper bound (prob. >= 1 - delta) on the drift RATE measured over these queries, one completion each."""
    vals = [b.bound if isinstance(b, DriftBound) else float(b) for b in bounds]
    if not vals:
        return 1.0
    return min(1.0, float(np.mean(vals)) + math.sqrt(math.log(1.0 / delta) / (2 * len(vals))))
