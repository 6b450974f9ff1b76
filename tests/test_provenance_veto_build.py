"""Veto table built from an index: its spans are exactly the high-BCI windows of violating documents
(brute-force enumeration), and a decoding context inside a planted forbidden phrase vetoes its next token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from provenance_corpus import FORBIDDEN, VOCAB, build, naive_risk
from tracealign_jax.config import ProvenanceConfig
from tracealign_jax.provenance.bci import BCIScorer
from tracealign_jax.provenance.veto_build import build_veto_table, collect_high_bci_spans
from tracealign_jax.provenance.veto_table import veto_penalties

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

    table, info = build_veto_table(index, scorer, CFG, TAU, progress=False)
    assert info["num_spans"] == len(got) and info["index_hash"] == index.manifest_hash
    table = jax.tree.map(jnp.asarray, table)
    phrase = FORBIDDEN[2]
    ctx = np.zeros((3, 4), np.int32)
    for r, k in enumerate((2, 3, 4)):
        ctx[r, 4 - k:] = phrase[:k]
    pen = np.asarray(veto_penalties(table, jnp.asarray(ctx), jnp.array([2, 3, 4]), VOCAB, 1))
    for r, k in enumerate((2, 3, 4)):
        expect = max(b for s, b in got.items() if len(s) > k and list(s[:k]) == list(phrase[:k]))
        assert pen[r, phrase[k]] >= expect > TAU
