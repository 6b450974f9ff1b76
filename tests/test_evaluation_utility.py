"""Perplexity of benign text, plain and under the Prov-Decode veto, vs an independent NumPy reference."""

import dataclasses

import numpy as np
import pytest

from tracealign_jax.config import DecodeConfig
from tracealign_jax.evaluation.utility import sequence_nll
from tracealign_jax.model import ModelArch, init_model
from tracealign_jax.veto.store import compile_veto_table


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def model():
    arch = ModelArch.from_hf_dict(dict(model_type="llama", vocab_size=24, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    return init_model(arch, seed=3)


def _reference(model, seqs, veto=None):
    """One unpadded forward per sequence; the veto as a dict {context suffix: {token: penalty}}."""
    total = 0.0
    for s in seqs:
        ids = np.asarray(s, np.int32)[None]
        logits, _ = model(ids, np.arange(ids.shape[1], dtype=np.int32)[None])
        lp = _log_softmax(np.asarray(logits[0], np.float64))
        for t in range(1, len(s)):
            row = lp[t - 1].copy()
            if veto is not None:
                spans, spec = veto
                pen = np.zeros_like(row)
                for span, bci in spans:  # every prefix of >= min_prefix tokens ending at t-1
                    for k in range(spec.min_prefix, len(span)):
                        if t >= k and list(s[t - k:t]) == list(span[:k]):
                            pen[span[k]] = max(pen[span[k]], bci)
                vetoed = pen > spec.tau
                row = row - np.where(vetoed, spec.gamma * pen, 0.0) if spec.veto == "soft" else np.where(vetoed, -1e9, row)
                row = _log_softmax(row)
            total -= row[s[t]]
    return total


SEQS = [[1, 5, 6, 7, 8, 9, 2], [1, 3, 5, 6, 4], [1, 10, 11, 5, 6, 7, 12, 13, 2, 2]]
SPANS = [([5, 6, 7, 8], 6.0), ([11, 5, 6], 2.5), ([20, 21, 22], 9.0)]


def test_plain_nll_matches_unpadded_forward(model):
    nll, n = sequence_nll(model, SEQS, batch_size=2)
    assert n == sum(len(s) - 1 for s in SEQS)
    np.testing.assert_allclose(nll, _reference(model, SEQS), rtol=1e-5)


@pytest.mark.parametrize("mode,min_prefix", [("soft", 1), ("soft", 2), ("hard", 2)])
def test_veto_adjusted_nll_matches_dictionary_reference(model, mode, min_prefix):
    table = compile_veto_table(SPANS, max_span=4, max_entries=4)
    spec = dataclasses.replace(DecodeConfig(), veto=mode, gamma=0.7, tau=2.0, min_prefix=min_prefix)
    nll, _ = sequence_nll(model, SEQS, veto_table=table, decode_cfg=spec, batch_size=4)
    ref = _reference(model, SEQS, (SPANS, spec))
    if mode == "hard":  # the text continues a vetoed span: forbidden tokens cost ~ the NEG_INF scale
        assert nll > 1e6 and ref > 1e6
    else:
        np.testing.assert_allclose(nll, ref, rtol=1e-5)
        assert nll > sequence_nll(model, SEQS)[0]


def test_score_from_skips_prompt_tokens(model):
    full, n_full = sequence_nll(model, SEQS)
    part, n_part = sequence_nll(model, SEQS, score_from=[3, 1, 4])
    assert n_part == n_full - 2 - 0 - 3 and part < full
