"""Decoding a tiny random Transformer: cache use vs full forward, real veto table, 8 devices, compile count."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracealign_jax import sharding
from tracealign_jax.config import DecodeConfig, MeshConfig
from tracealign_jax.decoding.runner import Decoder, left_pad
from tracealign_jax.decoding.step import brevity_penalty
from tracealign_jax.model import ModelArch, init_model
from tracealign_jax.veto.store import compile_veto_table

EOS = 1
ARCH = ModelArch.from_hf_dict(dict(
    model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3,
    eos_token_id=EOS, pad_token_id=0,
))  # fmt: skip
PROMPTS = [[5, 9, 11, 3], [7], [2, 40, 41, 42, 43, 44, 45, 46, 47, 8], [60, 61], [33, 34, 35], [90, 3, 3],
           [12, 13, 14, 15, 16, 17], [4, 4]]  # fmt: skip  (all in bucket 12: one compile per decoder)
CFG = DecodeConfig(method="beam", num_beams=3, max_new_tokens=6, length_penalty=0.6, prompt_buckets=(12, 16),
                   batch_size=8)  # fmt: skip
GREEDY_NEW = 8


@pytest.fixture(scope="module")
def model():
    return init_model(ARCH, seed=3)


@jax.jit
def _forward_logprobs(state, tokens_NxL):
    """log-softmax logits of a cache-free forward over right-padded rows (causal: padding is never seen)."""
    from flax import nnx

    model = nnx.merge(*state)
    positions = jnp.broadcast_to(jnp.arange(tokens_NxL.shape[1], dtype=jnp.int32), tokens_NxL.shape)
    logits, _ = model(tokens_NxL, positions)
    return jax.nn.log_softmax(logits, axis=-1)


def full_logprobs(model, seqs: list[list[int]], width: int = 24) -> np.ndarray:
    from flax import nnx

    tokens = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    return np.asarray(_forward_logprobs(nnx.split(model), jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def greedy_out(model):
    return Decoder(model, dataclasses.replace(CFG, method="greedy", max_new_tokens=GREEDY_NEW)).decode(PROMPTS)


def test_greedy_equals_full_forward_argmax(model, greedy_out):
    seqs = [list(p) for p in PROMPTS]
    want = [[] for _ in PROMPTS]
    done = [False] * len(PROMPTS)
    for _ in range(GREEDY_NEW):
        lp = full_logprobs(model, seqs)
        for i, s in enumerate(seqs):
            if not done[i]:
                want[i].append(int(np.argmax(lp[i, len(s) - 1])))
                s.append(want[i][-1])
                done[i] = want[i][-1] == EOS
    assert [c.token_ids for c in greedy_out] == want


@pytest.fixture(scope="module")
def veto_setup(model, greedy_out):
    # High-BCI spans that the unvetoed policy WOULD produce: prompt tail + its first greedy tokens.
    spans = [(list(p[-2:]) + c.token_ids[:3], 30.0) for p, c in zip(PROMPTS, greedy_out)]
    table = jax.tree.map(jnp.asarray, compile_veto_table(spans, max_span=5, max_entries=8))
    cfg = dataclasses.replace(CFG, veto="hard", tau=1.0, min_prefix=2)
    dec = Decoder(model, cfg, veto_table=table, refusal_ids=(7, 7))
    return spans, table, cfg, dec, dec.decode(PROMPTS), dec.decode(PROMPTS, veto="off")


def test_beam_scores_match_full_forward(model, veto_setup):
    # Every returned beam's score must be its log-prob under a cache-free forward, length-normalised:
    # a wrong per-beam cache gather on reorder scores tokens under another beam's history.
    plain = veto_setup[5]
    seqs, where = [], []
    for prompt, comp in zip(PROMPTS, plain):
        assert len(comp.beams) == CFG.num_beams
        scores = [s for _, s in comp.beams]
        assert scores == sorted(scores, reverse=True)
        for toks, score in comp.beams:
            seqs.append(list(prompt) + toks)
            where.append((len(prompt), toks, score))
    lp = full_logprobs(model, seqs)
    for row, (n, toks, score) in enumerate(where):
        total = sum(lp[row, n - 1 + i, t] for i, t in enumerate(toks))
        np.testing.assert_allclose(score, total / float(brevity_penalty(0.6, len(toks))), rtol=1e-4, atol=1e-4)


def _contains_vetoed(table_spans, seq, min_prefix, c):
    banned = {}
    for toks, pen in table_spans:
        for k in range(1, len(toks)):
            banned.setdefault(tuple(toks[:k]), set()).add(toks[k])
    for i in range(1, len(seq)):
        for k in range(min_prefix, min(c, i) + 1):
            if seq[i] in banned.get(tuple(seq[i - k : i]), ()):
                return True
    return False


def test_hard_veto_blocks_spans_and_reports_them(veto_setup):
    spans, table, _, _, vetoed, plain = veto_setup
    assert sum(c.vetoes for c in vetoed) > 0
    for prompt, comp, base in zip(PROMPTS, vetoed, plain):
        for toks, _ in comp.beams:
            if not comp.refused:
                assert not _contains_vetoed(spans, list(prompt) + toks, 2, table.context_len)
        # The reported spans account for every counted veto of the best sequence.
        assert sum(len(s["vetoed_token_ids"]) for s in comp.vetoed_spans) == comp.vetoes
        assert base.vetoes == 0 and base.vetoed_spans == []
    # The unvetoed policy does produce some of the spans (so the veto had something to block).
    assert any(_contains_vetoed(spans, list(p) + c.token_ids, 2, table.context_len) for p, c in zip(PROMPTS, plain))


def test_veto_path_compiles_once_per_bucket(veto_setup):
    dec = veto_setup[3]
    assert dec.jitted("hard")._cache_size() == 1  # PROMPTS: bucket 12
    dec.decode([p[::-1] for p in PROMPTS] + [[3, 3, 3]] * 5)  # new prompts, same bucket, 2 batches
    assert dec.jitted("hard")._cache_size() == 1
    dec.decode([list(range(3, 17)), [5] * 13])  # bucket 16
    assert dec.jitted("hard")._cache_size() == 2


def test_eight_devices_equal_single_device(veto_setup):
    _, table, cfg, _, single, _ = veto_setup
    assert len(jax.devices()) == 8
    mesh = sharding.build_mesh(MeshConfig(data=-1))
    rules = sharding.resolve_rules("fsdp_tp")
    sharded_model = init_model(ARCH, seed=3, mesh=mesh, rules=rules)
    dec = Decoder(sharded_model, cfg, veto_table=table, refusal_ids=(7, 7), mesh=mesh, rules=rules)
    out = dec.decode_batch(*left_pad(PROMPTS, 12, 8, 0))
    assert len(out.tokens_BxKxT.sharding.device_set) == 8
    assert out.tokens_BxKxT.sharding.shard_shape(out.tokens_BxKxT.shape)[0] == 1  # rows split over devices
    multi = dec.decode(PROMPTS)
    for a, b in zip(single, multi):
        assert [t for t, _ in a.beams] == [t for t, _ in b.beams]
        np.testing.assert_allclose([s for _, s in a.beams], [s for _, s in b.beams], rtol=1e-4, atol=1e-4)
        assert a.vetoes == b.vetoes and a.refused == b.refused
