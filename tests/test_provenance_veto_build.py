"""Veto table built from an index: its spans are exactly the high-BCI windows of violating documents
(brute-force enumeration), and a decoding context inside a planted forbidden phrase vetoes its next token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from provenance_corpus import FORBIDDEN, VOCAB, build, naive_risk
from tests.veto_dense import veto_penalties
from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.bci import BCIScorer
from tracealign_jax.provenance.veto_build import build_veto_table, collect_high_bci_spans

CFG = ProvenanceConfig(min_span=3, max_span=5, max_entries=4, sample_size=256)
TAU = 10.0


def test_collected_spans_equal_brute_force(tmp_path):
    docs, meta, index = build(tmp_path)
    scorer = BCIScorer(index, CFG)
    tokens, lengths, bci = collect_high_bci_spans(index, scorer, CFG, TAU, progress=False)
    got = {tuple(t[:n].tolist()): float(b) for t, n, b in zip(tokens, lengths, bci)}
    want = {}
    for doc, m in zip(docs, meta):
        if naive_risk(m) < 0.5:
            continue
        for n in range(CFG.min_span, CFG.max_span + 1):
            for i in range(len(doc) - n + 1):
                want.setdefault(tuple(int(x) for x in doc[i:i + n]), None)
    scores = scorer.score_spans([np.array(s) for s in want])
    want = {s: np.float32(sc.bci) for s, sc in zip(want, scores) if sc.bci > TAU}
    assert got == {s: float(b) for s, b in want.items()} and len(got) > 20

    for weighting in ("conflict", "none"):
        cfg = dataclasses.replace(CFG, veto_weighting=weighting)
        table, info = build_veto_table(index, scorer, cfg, TAU, progress=False)
        assert info["num_spans"] == len(got) and info["index_hash"] == index.manifest_hash
        table = jax.tree.map(jnp.asarray, table)
        entries = naive_entries(docs, meta, got, weighting, (scorer.prior.alpha, scorer.prior.beta))
        assert entries, weighting
        for phrase in FORBIDDEN:
            ctx = np.zeros((4, 4), np.int32)
            for r, k in enumerate((1, 2, 3, 4)):
                ctx[r, 4 - k:] = phrase[:k]
            pen = np.asarray(veto_penalties(table, jnp.asarray(ctx), jnp.array([1, 2, 3, 4]), VOCAB, 1))
            for r, k in enumerate((1, 2, 3, 4)):
                want = np.zeros(VOCAB, np.float32)
                for j in range(1, k + 1):  # every suffix length of the context
                    for v, p in entries.get(tuple(int(x) for x in phrase[k - j:k]), {}).items():
                        want[v] = max(want[v], p)
                np.testing.assert_allclose(pen[r], want, rtol=1e-5, err_msg=f"{weighting} k={k}")
            if weighting == "none":
                assert pen[3, phrase[4]] > TAU  # inside a planted phrase the next token is vetoed


def naive_entries(docs, meta, spans: dict, weighting: str, prior: tuple[float, float]) -> dict:
    """context tuple -> {next token: penalty}: the top ``max_entries`` (span BCI x weight) over the spans
    that extend the context, weight = the naive posterior conflict of context + next token (entries whose
    P(violating share > 1/2) is at most ``min_posterior`` dropped), or 1."""
    a, b_prior = prior
    risks: dict = {}  # every n-gram of the corpus (n <= max_span) -> the risks of its occurrences' documents
    for doc, m in zip(docs, meta):
        for n in range(2, CFG.max_span + 1):
            for i in range(len(doc) - n + 1):
                risks.setdefault(tuple(int(x) for x in doc[i:i + n]), []).append(naive_risk(m))
    out: dict = {}
    for s, b in spans.items():
        for k in range(1, len(s)):
            if weighting == "conflict":
                r = risks[s[:k + 1]]
                conflict = (sum(r) + a) / (len(r) + a + b_prior)
                p_violating = stats.beta(a + sum(r), b_prior + len(r) - sum(r)).sf(0.5)
                b_k = np.float32(np.float32(b) * conflict)
                if not (b_k > TAU and p_violating > CFG.min_posterior):
                    continue
            else:
                b_k = np.float32(b)
            row = out.setdefault(tuple(s[:k]), {})
            row[s[k]] = max(row.get(s[k], 0.0), float(b_k))
    for c, row in out.items():
        out[c] = dict(sorted(row.items(), key=lambda kv: -kv[1])[:CFG.max_entries])
    return out
