"""The jitted train step: sharded == single device, accumulation == big batch, non-finite skip, CBD (b)
against a brute-force transcription, and a tiny Llama that learns a toy preference set."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _training_toy import toy_config, write_toy_preferences
from tracealign_jax import sharding
from tracealign_jax.config import MeshConfig
from tracealign_jax.pairs import load_pairs
from tracealign_jax.training.data import BatchStream
from tracealign_jax.training.loop import to_device_batch, train
from tracealign_jax.training.state import graphdef_and_abstract_params, init_train_state, state_shardings
from tracealign_jax.training.step import batch_fields, batch_shardings, make_train_step, pair_layout


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    return write_toy_preferences(d / "prefs.jsonl"), d


def _runner(cfg, mesh_cfg: MeshConfig, devices, veto=None):
    mesh = sharding.build_mesh(mesh_cfg, devices)
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, state = init_train_state(cfg, mesh, rules)
    _, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    return graphdef, state, lambda s, b: fn(s, b, veto), batch_shardings(cfg, mesh, rules)


def _host_batches(cfg, n):
    stream = BatchStream(load_pairs(cfg.data), cfg.data, cfg.train.batch_size, layout=pair_layout(cfg))
    return [next(stream) for _ in range(n)]


def _run(cfg, mesh_cfg, devices, batches, veto=None):
    graphdef, state, fn, b_sh = _runner(cfg, mesh_cfg, devices, veto)
    out = []
    for hb in batches:
        state, m = fn(state, to_device_batch({k: hb[k] for k in batch_fields(cfg)}, b_sh))
        out.append({k: float(v) for k, v in m.items()})
    return graphdef, state, out


def _params_np(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_sharded_step_matches_single_device(toy):
    path, d = toy
    # Adam's update lr * m / (sqrt(v) + eps) turns float32 reduction-order noise in near-zero gradients
    # into O(lr) parameter differences; a larger eps keeps the comparison about the step, not that.
    cfg = toy_config(path, d / "a", "train.eps=1e-4")
    batches = _host_batches(cfg, 2)
    _, s1, m1 = _run(cfg, MeshConfig(data=1), jax.devices()[:1], batches)
    _, s8, m8 = _run(cfg, MeshConfig(data=1, fsdp=4, tensor=2), jax.devices(), batches)
    assert len(jax.tree.leaves(s8.params)[0].sharding.device_set) == 8
    for a, b in zip(m1, m8):
        for k in ("loss/total", "grad_norm", "rewards/margins", "logps/chosen"):
            np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for x, y in zip(_params_np(s1), _params_np(s8)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_micro_batches_equal_one_big_batch(toy):
    """Accumulating 4 micro-batches normalised by the global token counts == one batch of 8 pairs,
    with an RPO NLL term so the token weighting matters (chosen responses differ in length)."""
    path, d = toy
    extra = ("loss.rpo_alpha=1.0", "train.eps=1e-4", "train.micro_batches=1")  # eps: see the sharded test
    cfg1 = toy_config(path, d / "b", *extra)
    cfg4 = toy_config(path, d / "b", *extra[:-1], "train.micro_batches=4")
    batches = _host_batches(cfg1, 1)
    lens = batches[0]["loss_mask"][0::2].sum(1)
    assert len(set(lens.tolist())) > 1
    _, s1, m1 = _run(cfg1, MeshConfig(data=1), jax.devices()[:1], batches)
    _, s4, m4 = _run(cfg4, MeshConfig(data=1), jax.devices()[:1], batches)
    for k in ("loss/total", "loss/nll", "grad_norm", "rewards/accuracies"):
        np.testing.assert_allclose(m1[0][k], m4[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    for x, y in zip(_params_np(s1), _params_np(s4)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_skips_update_and_counts(toy):
    path, d = toy
    cfg = toy_config(path, d / "c", "loss.reference=precomputed")
    hb = _host_batches(toy_config(path, d / "c"), 1)[0]
    graphdef, state, fn, b_sh = _runner(cfg, MeshConfig(data=1), jax.devices()[:1])
    before = _params_np(state)
    bad = dict(hb, ref_logps=np.full(hb["tokens"].shape, np.nan, np.float32))
    good = dict(hb, ref_logps=np.zeros(hb["tokens"].shape, np.float32))
    dev = lambda b: to_device_batch({k: b[k] for k in batch_fields(cfg)}, b_sh)  # noqa: E731
    state, m = fn(state, dev(bad))
    assert m["nonfinite"] == 1 and m["nonfinite_in_row"] == 1 and int(state.step) == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, _params_np(state)))
    state, m = fn(state, dev(bad))
    assert m["nonfinite_in_row"] == 2 and m["skipped_total"] == 2
    state, m = fn(state, dev(good))
    assert m["nonfinite"] == 0 and m["nonfinite_in_row"] == 0 and m["skipped_total"] == 2 and int(state.step) == 1
    assert not all(np.array_equal(a, b) for a, b in zip(before, _params_np(state)))


def test_cbd_continuation_term_matches_bruteforce(toy):
    """CBD (b) inside the jitted step equals
    sum_t sum_{vetoed v} min(penalty / scale, 1) * max(0, logp(v | prefix_t) - logp_ref(v | prefix_t) + margin) / tokens,
    computed here from full logits of policy and reference and a naive suffix match against the span list."""
    from tracealign_jax.veto.store import compile_veto_table

    path, d = toy
    spans = [([10, 11, 12, 13], 7.0), ([12, 13, 14], 3.0), ([150, 160], 2.0), ([14, 15, 16, 17, 18], 11.0)]
    veto = jax.tree.map(jnp.asarray, compile_veto_table(spans, max_span=5, max_entries=4))
    margin, scale = 0.02, 5.0
    # The brute force reads two-row pairs; the shared-prompt layout's veto contexts and entry log-probs
    # equal these (tests/test_training_shared_prompt.py).
    cfg = toy_config(path, d / "e", "loss.cbd_cont_weight=0.5", "train.learning_rate=0.0", f"loss.cbd_margin={margin}",
                     f"loss.cbd_bci_scale={scale}", "data.pair_layout=separate")  # fmt: skip
    hb = _host_batches(cfg, 1)[0]
    graphdef, state, fn, b_sh = _runner(cfg, MeshConfig(data=1), jax.devices()[:1], veto)
    # a policy that differs from the reference, so the hinge is active for some entries and not others
    state = state.replace(params=jax.tree.map(lambda x: x * 1.3, state.params))
    params = jax.tree.map(np.asarray, state.params)
    ref_params = jax.tree.map(np.asarray, state.ref_params)
    _, m = fn(state, to_device_batch({k: hb[k] for k in batch_fields(cfg)}, b_sh))

    def full_logp(p):
        model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, p))
        logits, _ = model(jnp.asarray(hb["tokens"]), jnp.asarray(hb["positions"]), jnp.asarray(hb["valid"]))
        return np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)

    logp, ref_logp = full_logp(params), full_logp(ref_params)
    mask = hb["loss_mask"]
    total, active, inactive = 0.0, 0, 0
    for r in range(mask.shape[0]):
        toks = hb["tokens"][r].tolist()
        for t in range(1, mask.shape[1]):
            if not mask[r, t]:
                continue
            vetoed: dict[int, float] = {}
            for span, pen in spans:
                for k in range(1, len(span)):
                    if t >= k and toks[t - k : t] == span[:k]:
                        vetoed[span[k]] = max(vetoed.get(span[k], 0.0), pen)
            for v, pen in vetoed.items():
                gap = logp[r, t - 1, v] - ref_logp[r, t - 1, v] + margin
                active, inactive = active + (gap > 0), inactive + (gap <= 0)
                total += min(pen / scale, 1.0) * max(gap, 0.0)
    assert active > 0 and inactive > 0  # the toy responses run through the vetoed spans; both hinge sides occur
    np.testing.assert_allclose(m["loss/cbd_cont"], total / mask.sum(), rtol=1e-4)
    np.testing.assert_allclose(m["loss/total"], m["loss/pref"] + 0.5 * m["loss/cbd_cont"], rtol=1e-6)


def test_tiny_llama_learns_toy_preferences(toy):
    path, d = toy
    cfg = toy_config(path, d / "run", "train.steps=10", "train.log_every=1")
    result = train(cfg, show_progress=False)
    h = result.history
    assert len(h) == 10
    first, last = h[0], h[-1]
    assert first["rewards/accuracies"] <= 0.75 and abs(first["rewards/margins"]) < 1e-3
    assert last["rewards/accuracies"] == 1.0
    assert last["rewards/margins"] > 0.5 and last["loss/total"] < 0.5 * first["loss/total"]
    rows = [json.loads(x) for x in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert {"lr", "grad_norm", "tokens_per_s", "rewards/chosen", "logps/rejected"} <= set(rows[0])
    assert list((d / "run" / "tb").glob("events.out.tfevents.*"))


def test_bf16_compute_with_fp32_master_weights_and_remat(toy):
    path, d = toy
    cfg = toy_config(path, d / "f", "model.dtype=bfloat16", "model.remat=full", "train.logprob_chunk=8")
    batches = _host_batches(cfg, 2)
    _, state, m = _run(cfg, MeshConfig(data=1), jax.devices()[:1], batches)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.ref_params)} == {jnp.dtype(jnp.bfloat16)}
    assert all(np.isfinite(r["loss/total"]) and r["nonfinite"] == 0 for r in m)
    np.testing.assert_allclose(m[0]["loss/total"], np.log(2.0), rtol=1e-2)  # policy == reference at step 1
    assert m[1]["loss/total"] < m[0]["loss/total"]


def test_loop_aborts_after_n_nonfinite_steps_in_a_row(toy):
    """A reference store full of NaN makes every loss non-finite: the loop stops at the N-th in a row."""
    from tracealign_jax.response_store import write_response_arrays
    from tracealign_jax.training import reference
    from tracealign_jax.training.loop import NonFiniteLossError

    path, d = toy
    cfg = toy_config(path, d / "g", "loss.reference=precomputed", f"data.ref_logps_path={d / 'g-refs'}",
                     "train.max_nonfinite_in_row=3", "train.steps=10")  # fmt: skip
    pairs = load_pairs(cfg.data)
    nan = [(np.full(len(pairs.get("chosen", i)), np.nan, np.float32), np.full(len(pairs.get("rejected", i)), np.nan, np.float32))
           for i in range(len(pairs))]  # fmt: skip
    write_response_arrays(reference.store_path(cfg, pairs), nan, meta={"kind": "reference_logps"})
    with pytest.raises(NonFiniteLossError, match="step 3: 3 consecutive non-finite"):
        train(cfg, show_progress=False)
    rows = [json.loads(x) for x in (d / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_total"] for r in rows] == [1, 2, 3]
