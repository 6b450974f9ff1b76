"""Impact scores by one forward-mode JVP equal the explicit per-example gradient dot products (vmap(grad))
on a tiny Llama; g_J accumulates exactly over batches; weights follow TRACE's formula."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _pair_rows import random_pair_rows
from flax import nnx

from hf_tiny import numpy_model
from tracealign_jax.model import ModelArch
from tracealign_jax.realign import impact
from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS

ARCH = ModelArch.from_hf_dict(dict(
    model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
))  # fmt: skip
L = 16


def make_batch(categories, seed=0, layout="separate", length=L):
    """Training-layout rows (separate: 2i / 2i+1 = y_w / y_l of pair i; or shared-prompt rows) of random
    prompts and responses, right-padded."""
    rows = random_pair_rows(len(categories), length, seed, vocab=64, prompt_len=(2, 6), response_len=(3, 8), layout=layout)
    return {**{k: jnp.asarray(v) for k, v in rows.items()}, "category": jnp.asarray(categories, jnp.int32)}


@pytest.fixture(scope="module")
def model():
    graphdef, params = nnx.split(numpy_model(ARCH, seed=1))
    return graphdef, params


CATS_A = [RETAIN, INVERT, SUPPRESS, INVERT, RETAIN, SUPPRESS]
CATS_B = [SUPPRESS, RETAIN, INVERT, impact.PAD, impact.PAD, INVERT]


@pytest.mark.parametrize("invert_loss", ["logistic", "ipo"])
def test_jvp_scores_equal_explicit_per_example_gradients(model, invert_loss):
    graphdef, params = model
    batch = make_batch(CATS_A, seed=2)
    g_j = impact.gold_gradient(graphdef, params, [batch], beta=0.3)
    kw = dict(graphdef=graphdef, beta=0.3, invert_loss=invert_loss)
    fast = np.asarray(impact.conflict_scores(params, batch, g_j, **kw))
    slow = np.asarray(impact.explicit_conflict_scores(params, batch, g_j, **kw))
    conf = np.isin(CATS_A, (INVERT, SUPPRESS))
    assert np.all(np.abs(slow[conf]) > 1e-3) and np.all(fast[~conf] == 0) and np.all(slow[~conf] == 0)
    assert (slow[conf] > 0).any() and (slow[conf] < 0).any()  # max(0, .) clips something
    np.testing.assert_allclose(fast, slow, rtol=1e-4)


def test_shared_rows_and_response_only_unembedding_give_the_same_scores(model, monkeypatch):
    """The production path (prompt computed once, logits only on response tokens; also with blocked
    attention in 8-query blocks) against the explicit per-pair gradients of the two-row layout with
    every position unembedded."""
    from tracealign_jax.model import attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 8)
    graphdef, params = model
    sep, shared = make_batch(CATS_A, seed=7), make_batch(CATS_A, seed=7, layout="shared_prompt", length=22)
    assert shared["tokens"].shape == (6, 22) and int(shared["valid"].sum()) < int(sep["valid"].sum())
    kw = dict(graphdef=graphdef, beta=0.3, invert_loss="logistic")
    g_sep = impact.gold_gradient(graphdef, params, [sep], beta=0.3)
    g_shared = impact.gold_gradient(graphdef, params, [shared], beta=0.3, response_len=14)
    for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_sep)):  # float32 rounding on entries ~0.1
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    want = np.asarray(impact.explicit_conflict_scores(params, sep, g_sep, **kw))
    for batch, response_len, attn in ((sep, 7, "einsum"), (shared, 14, "einsum"), (shared, 0, "einsum"), (shared, 14, "blocked")):
        got = np.asarray(impact.conflict_scores(params, batch, g_sep, **kw, response_len=response_len, attention=attn))
        np.testing.assert_allclose(got, want, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(impact.explicit_conflict_scores(params, shared, g_sep, **kw, response_len=14)),
                               want, rtol=1e-4)  # fmt: skip
    with pytest.raises(ValueError, match="response_len=13"):  # a row of 14 response tokens would be cut
        impact.impact_scores(graphdef, params, [shared], beta=0.3, response_len=13)


@functools.partial(jax.jit, static_argnames="graphdef")
def _explicit_gold_grads(params, batch, graphdef):
    return impact.per_pair_gradients(lambda p, b: impact.gold_losses(graphdef, p, b, beta=0.3), params, batch)


def test_gold_gradient_accumulates_over_batches_and_matches_per_pair_mean(model):
    graphdef, params = model
    a, b = make_batch(CATS_A, seed=3), make_batch(CATS_B, seed=4)
    g_two = impact.gold_gradient(graphdef, params, [a, b], beta=0.3)
    # explicit: mean over the gold pairs of the per-pair gradients (vmap(grad)), both batches
    per = [_explicit_gold_grads(params, bt, graphdef) for bt in (a, b)]
    n_gold = sum(int(np.isin(np.asarray(bt["category"]), (RETAIN, INVERT)).sum()) for bt in (a, b))
    assert n_gold == 7
    want = jax.tree.map(lambda x, y: (x.sum(0) + y.sum(0)) / n_gold, *per)
    for got_leaf, want_leaf in zip(jax.tree.leaves(g_two), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="gold set"):  # a pure-suppress set has no gold pair
        impact.gold_gradient(graphdef, params, [make_batch([SUPPRESS] * 6)], beta=0.3)


def test_impact_scores_end_to_end_and_weights(model):
    graphdef, params = model
    a, b = make_batch(CATS_A, seed=5), make_batch(CATS_B, seed=6)
    scores = impact.impact_scores(graphdef, params, [a, b], beta=0.3)
    assert scores.shape == (10,)  # 12 slots, 2 PAD
    g_j = impact.gold_gradient(graphdef, params, [a, b], beta=0.3)
    kw = dict(graphdef=graphdef, beta=0.3, invert_loss="logistic")
    want = np.concatenate([np.asarray(impact.explicit_conflict_scores(params, a, g_j, **kw)),
                           np.asarray(impact.explicit_conflict_scores(params, b, g_j, **kw))[[0, 1, 2, 5]]])  # fmt: skip
    np.testing.assert_allclose(scores, want, rtol=1e-4)
    cats = np.array(CATS_A + [c for c in CATS_B if c != impact.PAD])
    w = impact.impact_weights(scores, cats, gamma=2.0)
    conf = np.isin(cats, (INVERT, SUPPRESS))
    raw = np.where(conf, np.maximum(want, 0) / 2.0, 0.0)
    np.testing.assert_allclose(w["raw"], raw, rtol=1e-4)
    np.testing.assert_allclose(w["weight"], raw / raw.sum(), rtol=1e-4)
    np.testing.assert_allclose(w["weight"].sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(w["weight_mean1"], raw / raw.sum() * conf.sum(), rtol=1e-4)


def test_impact_weights_edge_cases():
    cats = np.array([RETAIN, INVERT, SUPPRESS])
    w = impact.impact_weights(np.array([5.0, -1.0, -2.0]), cats)  # no positive conflict: uniform
    assert w["weight"].tolist() == [0.0, 0.5, 0.5] and w["raw"].tolist() == [0.0, 0.0, 0.0]
    w = impact.impact_weights(np.array([5.0, 3.0, 1.0]), cats)  # retained pairs never get weight
    np.testing.assert_allclose(w["weight"], [0.0, 0.75, 0.25])
    assert impact.impact_weights(np.array([1.0]), np.array([RETAIN]))["weight"].tolist() == [0.0]
    with pytest.raises(ValueError, match="gamma"):
        impact.impact_weights(np.ones(3), cats, gamma=0.0)


def test_impact_on_an_8_device_mesh_equals_one_device(model):
    """FSDP x tensor x data on 8 simulated devices: the same scores and g_J as one device; g_J lives in
    the parameters' declared shardings (a weight is split, never gathered whole onto one device)."""
    from tracealign_jax import sharding
    from tracealign_jax.config import MeshConfig
    from tracealign_jax.model import param_shardings

    graphdef, params = model
    mesh = sharding.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cats = [CATS_A + [INVERT, RETAIN], [RETAIN] * 8, [SUPPRESS, impact.PAD] + CATS_B[:6]]
    batches = [make_batch(c, seed=20 + i, layout="shared_prompt", length=22) for i, c in enumerate(cats)]
    kw = dict(beta=0.3, response_len=14, attention="blocked")
    one = impact.impact_scores(graphdef, params, batches, **kw)
    eight = impact.impact_scores(graphdef, params, batches, mesh=mesh, **kw)
    assert one.shape == (21,) and np.all(one[8:16] == 0)  # retained pairs score 0
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6 * np.abs(one).max())
    g_one = impact.gold_gradient(graphdef, params, batches, beta=0.3, response_len=14)
    g_eight = impact.gold_gradient(graphdef, params, batches, beta=0.3, response_len=14, mesh=mesh)
    want = param_shardings(params, mesh, sharding.resolve_rules("fsdp_tp"))
    for a, b, sh in zip(jax.tree.leaves(g_eight), jax.tree.leaves(g_one), jax.tree.leaves(want)):
        assert a.sharding == sh
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in jax.tree.leaves(want))
