"""Shared-prompt pair rows ([prompt | chosen | rejected], prompt computed once) against the separate
two-row layout, the reference: per-token log-probs of both responses, CBD (b) veto contexts and entry
log-probs, the DPO+CBD(a) loss and its gradient, and the precomputed reference store (fp32, <= 1e-5)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _training_toy import toy_config, write_toy_preferences
from tracealign_jax import sharding
from tracealign_jax.config import MeshConfig
from tracealign_jax.pairs import load_pairs
from tracealign_jax.training import reference
from tracealign_jax.training.data import build_batch, row_length, split_responses
from tracealign_jax.training.logprobs import predecessor_slots, veto_contexts
from tracealign_jax.training.state import init_train_state
from tracealign_jax.training.step import _forward_logps, _pair_rows, batch_fields, loss_fn

IDX = np.arange(6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    path = write_toy_preferences(d / "prefs.jsonl", n=12, seed=3)
    # A sliding window shorter than the rows: rejected tokens must count distance by position.
    arch = ["model.arch.model_type=mistral", "model.arch.sliding_window=7", "loss.cbd_data_weight=1.0",
            "loss.cbd_bci_scale=2.0", "train.batch_size=6"]  # fmt: skip
    cfgs = {lay: toy_config(path, d / lay, *arch, f"data.pair_layout={lay}") for lay in ("separate", "shared_prompt")}
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfgs["separate"].mesh.rules)
    graphdef, state = init_train_state(cfgs["separate"], mesh, rules)
    pairs = load_pairs(cfgs["separate"].data)
    batches = {lay: build_batch(pairs, IDX, row_length(32, lay, 16), layout=lay) for lay in cfgs}
    return cfgs, graphdef, state, pairs, batches, mesh, rules


def _responses(batch: dict, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(chosen, rejected) values of a per-token array in either layout."""
    if "branch" in batch:
        return split_responses(x, batch["branch"], batch["loss_mask"])
    return [tuple(x[2 * i + j][batch["loss_mask"][2 * i + j] > 0] for j in range(2)) for i in range(len(x) // 2)]


def _dev(cfg, batch):
    return {k: jnp.asarray(batch[k]) for k in batch_fields(cfg) if k in batch}


def test_layout_holds_the_same_pairs(setup):
    _, _, _, pairs, batches, _, _ = setup
    sep, sh = batches["separate"], batches["shared_prompt"]
    assert sh["tokens"].shape == (6, 48) and sep["tokens"].shape == (12, 32)
    assert sh["valid"].sum() < sep["valid"].sum()  # the prompt is stored once
    for (c, r), ex in zip(_responses(sh, sh["tokens"]), IDX):
        assert c.tolist() == pairs.get("chosen", int(ex)).tolist() and r.tolist() == pairs.get("rejected", int(ex)).tolist()
        p = len(pairs.get("prompt", int(ex)))
    row = sh["positions"][-1][sh["branch"][-1] == 2]
    assert row.tolist() == list(range(p, p + len(row)))  # rejected continues from the prompt's end


def test_logps_and_entry_logps_equal_separate(setup):
    cfgs, graphdef, state, _, batches, _, _ = setup
    rng = np.random.default_rng(0)
    out = {}
    entries_sep = rng.integers(0, 512, size=batches["separate"]["tokens"].shape + (3,)).astype(np.int32)
    for lay, batch in batches.items():
        if lay == "separate":
            ent = entries_sep
        else:  # the same entry ids, placed on the shared row's response tokens
            ent = np.zeros(batch["tokens"].shape + (3,), np.int32)
            for i in range(len(IDX)):
                for j in range(2):
                    sel = batch["branch"][i] == j + 1
                    ent[i, sel] = entries_sep[2 * i + j][batches["separate"]["loss_mask"][2 * i + j] > 0]
        fwd = jax.jit(lambda p, b, e: _forward_logps(graphdef, p, b, 8, e))
        logps, ent_logps = fwd(state.params, _dev(cfgs[lay], batch), jnp.asarray(ent))
        out[lay] = (_responses(batch, np.asarray(logps)), _responses(batch, np.asarray(ent_logps)))
    for k in range(2):
        for a, b in zip(out["separate"][k], out["shared_prompt"][k]):
            for x, y in zip(a, b):
                np.testing.assert_allclose(y, x, atol=1e-5, rtol=0)
    assert all(len(c) and (c < 0).all() for c, _ in out["shared_prompt"][0])


def test_veto_contexts_follow_the_pair(setup):
    _, _, _, _, batches, _, _ = setup
    sep, sh = batches["separate"], batches["shared_prompt"]
    ctx_sep, n_sep = veto_contexts(jnp.asarray(sep["tokens"]), 5)
    ctx_sh, n_sh = veto_contexts(jnp.asarray(sh["tokens"]), 5, predecessor_slots(jnp.asarray(sh["branch"])))
    for arr_sep, arr_sh in ((ctx_sep, ctx_sh), (n_sep, n_sh)):
        for a, b in zip(_responses(sep, np.asarray(arr_sep)), _responses(sh, np.asarray(arr_sh))):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(y, x)


def test_loss_and_gradients_equal_separate(setup):
    cfgs, graphdef, state, _, batches, _, _ = setup
    rng = np.random.default_rng(1)
    bci_sep = np.where(batches["separate"]["loss_mask"] > 0, rng.exponential(2.0, batches["separate"]["loss_mask"].shape), 0)
    bci_sh = np.zeros(batches["shared_prompt"]["tokens"].shape, np.float32)
    for i, (c, r) in enumerate(_responses(batches["separate"], bci_sep)):
        for j, vals in enumerate((c, r)):
            bci_sh[i, batches["shared_prompt"]["branch"][i] == j + 1] = vals
    bcis = {"separate": bci_sep.astype(np.float32), "shared_prompt": bci_sh}
    # A policy away from the reference, so rewards and their signs are not ties at 0.
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    policy = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    got = {}
    for lay, batch in batches.items():
        cfg = cfgs[lay]
        dev = {**_dev(cfg, batch), "bci": jnp.asarray(bcis[lay])}
        mask = _pair_rows(dev)[0]
        counts = {"pairs": jnp.float32(len(IDX)), "tokens": jnp.sum(mask), "chosen_tokens": jnp.sum(mask[0::2])}
        f = jax.jit(jax.value_and_grad(lambda p, b, c: loss_fn(p, state, b, None, c, cfg=cfg, graphdef=graphdef), has_aux=True))
        (loss, metrics), grads = f(policy, dev, counts)
        got[lay] = (float(loss), {k: float(v) for k, v in metrics.items()}, jax.tree.leaves(grads))
    (l_sep, m_sep, g_sep), (l_sh, m_sh, g_sh) = got["separate"], got["shared_prompt"]
    assert m_sep["loss/cbd_data"] > 0 and 0 < m_sep["rewards/accuracies"] < 1
    assert l_sh == pytest.approx(l_sep, abs=1e-5)
    for k in m_sep:
        assert m_sh[k] == pytest.approx(m_sep[k], abs=1e-5), k
    for a, b in zip(g_sep, g_sh):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)
    assert max(float(jnp.max(jnp.abs(a))) for a in g_sep) > 1e-3  # a gradient that can differ


def test_reference_precompute_equal_separate(setup, tmp_path):
    cfgs, graphdef, state, pairs, _, mesh, rules = setup
    stores = {}
    for lay, cfg in cfgs.items():
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, ref_logps_path=str(tmp_path / lay)))
        stores[lay] = reference.precompute_reference(cfg, graphdef, state.params, pairs, mesh, rules, batch_size=5)
    idx = np.arange(len(pairs))
    for a, b in zip(stores["separate"].read(idx), stores["shared_prompt"].read(idx)):
        for x, y in zip(a, b):
            assert len(x) == len(y) > 0
            np.testing.assert_allclose(y, x, atol=1e-5, rtol=0)


def test_shared_rows_take_the_shortest_row_that_fits(setup):
    cfgs, _, _, pairs, _, _, _ = setup
    from tracealign_jax.training.data import BatchStream, layout_buckets

    cfg = cfgs["shared_prompt"].data
    assert layout_buckets(cfg.buckets, "shared_prompt", cfg.max_response_len) == (32, 48)
    stream = BatchStream(pairs, cfg, 2, layout="shared_prompt")
    total = pairs.lengths("prompt") + pairs.lengths("chosen") + pairs.lengths("rejected")
    for _ in range(6):
        b = next(stream)
        need = total[b["index"]].max()
        assert b["tokens"].shape[1] == (32 if need <= 32 else 48) and b["valid"].sum(1).tolist() == total[b["index"]].tolist()


def test_both_layouts_train_the_same_pairs_together(setup):
    """The layout is a speed setting: the batches (which pairs, in which order) are the same in both, so
    switching it cannot change what a run learns beyond float rounding (grouping shared rows by their
    own length once put all long-rejected pairs in the same batches and moved the demo's drift 3x)."""
    cfgs, _, _, pairs, _, _, _ = setup
    from tracealign_jax.training.data import BatchStream

    data = {lay: dataclasses.replace(cfgs[lay].data, buckets=(16, 32)) for lay in cfgs}  # shared rows: 16 | 32 | 48
    streams = {lay: BatchStream(pairs, data[lay], 2, layout=lay) for lay in cfgs}
    total = pairs.lengths("prompt") + pairs.lengths("chosen") + pairs.lengths("rejected")
    longer = pairs.lengths("prompt") + np.maximum(pairs.lengths("chosen"), pairs.lengths("rejected"))
    assert np.any((longer <= 16) & (total > 16))  # pairs a grouping by shared length would move to another bucket
    lengths = set()
    for _ in range(15):  # past an epoch boundary
        sep, sh = next(streams["separate"]), next(streams["shared_prompt"])
        assert sep["index"].tolist() == sh["index"].tolist()
        assert sh["tokens"].shape[1] >= total[sh["index"]].max()
        lengths.add((sep["tokens"].shape[1], sh["tokens"].shape[1]))
    assert (16, 32) in lengths  # a bucket-16 batch in shared rows of 32: the row grows, the batch stays

@pytest.mark.parametrize("lay", ["separate", "shared_prompt"])
def test_response_only_logits_equal_every_slot(setup, lay):
    """The train step unembeds only the response tokens (``step.response_slots``: 16 of 32 slots per
    separate row, 32 of 48 per shared row): log-probs, CBD (b) entry log-probs, the DPO+CBD (a) loss and
    its gradients equal those from unembedding every slot (``data.max_response_len`` past the row)."""
    cfgs, graphdef, state, _, batches, _, _ = setup
    from tracealign_jax.training.step import response_slots

    cfg, batch = cfgs[lay], batches[lay]
    every = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_response_len=1000))
    slots = response_slots(cfg)
    assert slots == (32 if lay == "shared_prompt" else 16) < batch["tokens"].shape[1] <= response_slots(every)
    rng = np.random.default_rng(4)
    dev = {**_dev(cfg, batch), "bci": jnp.asarray(np.where(batch["loss_mask"] > 0, rng.exponential(2.0, batch["loss_mask"].shape), 0), jnp.float32)}
    ent = jnp.asarray(rng.integers(0, 512, size=batch["tokens"].shape + (3,)), jnp.int32)
    resp = batch["loss_mask"] > 0
    (lp, elp), (lp_all, elp_all) = (jax.jit(lambda p, b, e, s=s: _forward_logps(graphdef, p, b, 8, e, response_slots=s))(state.params, dev, ent)
                                    for s in (slots, response_slots(every)))  # fmt: skip
    np.testing.assert_allclose(np.asarray(lp)[resp], np.asarray(lp_all)[resp], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(elp)[resp], np.asarray(elp_all)[resp], atol=1e-5, rtol=0)
    assert not np.asarray(lp)[~resp].any() and np.asarray(lp_all)[~resp].any()  # prompt logits: never computed
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    policy = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    mask = _pair_rows(dev)[0]
    counts = {"pairs": jnp.float32(len(IDX)), "tokens": jnp.sum(mask), "chosen_tokens": jnp.sum(mask[0::2])}
    got = []
    for c in (cfg, every):
        f = jax.jit(jax.value_and_grad(lambda p, b, n, c=c: loss_fn(p, state, b, None, n, cfg=c, graphdef=graphdef), has_aux=True))
        (loss, metrics), grads = f(policy, dev, counts)
        got.append((float(loss), jax.tree.leaves(grads)))
    assert got[0][0] == pytest.approx(got[1][0], abs=1e-6)
    for a, b in zip(got[0][1], got[1][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
    assert max(float(jnp.max(jnp.abs(a))) for a in got[0][1]) > 1e-3


def test_a_response_longer_than_the_scored_slots_is_refused(setup):
    cfgs, _, _, pairs, _, _, _ = setup
    from tracealign_jax.config import ConfigError
    from tracealign_jax.training.data import BatchStream

    longest = int(max(pairs.lengths("chosen").max(), pairs.lengths("rejected").max()))
    short = dataclasses.replace(cfgs["separate"].data, max_response_len=longest - 1)
    with pytest.raises(ConfigError, match=rf"{longest} tokens, more than data.max_response_len={longest - 1}"):
        BatchStream(pairs, short, 2)
    BatchStream(pairs, dataclasses.replace(short, max_response_len=longest), 2)
