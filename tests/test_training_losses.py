"""Each loss against a NumPy (float64) transcription of its formula; gradients by finite differences."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracealign_jax.config import LossConfig
from tracealign_jax.training import losses
from tracealign_jax.training.logprobs import scored_slots, token_logprobs, veto_contexts


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_pref(pc, pr, rc, rr, loss_type, beta, ls, lc=None, lr=None):
    m = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        per = -(1 - ls) * np_logsig(beta * m) - ls * np_logsig(-beta * m)
    elif loss_type == "robust":
        per = (-(1 - ls) * np_logsig(beta * m) + ls * np_logsig(-beta * m)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        per = np.maximum(0.0, 1 - beta * m)
    else:
        am = (pc - rc) / lc - (pr - rr) / lr
        per = (am - 1 / (2 * beta)) ** 2
    return per.mean()


def np_cbd_data(p, r, mask, bci, margin, scale):
    return np.sum(np.maximum(0.0, p - r + margin) * np.minimum(bci / scale, 1.0) * mask) / mask.sum()


def np_cbd_cont(ent, ref_ent, pen, valid, mask, margin, scale):
    w = valid * mask[..., None] * np.minimum(pen / scale, 1.0)
    return np.sum(np.maximum(0.0, ent - ref_ent + margin) * w) / mask.sum()


def fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_preference_loss_matches_numpy(loss_type, ls):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, size=6) for _ in range(4))
    lc, lr = rng.integers(3, 9, size=6).astype(float), rng.integers(3, 9, size=6).astype(float)
    beta = 0.3

    def ours(pc_):
        loss, _ = losses.preference_loss(
            jnp.asarray(pc_, jnp.float32), jnp.asarray(pr, jnp.float32), jnp.asarray(rc, jnp.float32),
            jnp.asarray(rr, jnp.float32), loss_type=loss_type, beta=beta, label_smoothing=ls,
            chosen_len_B=jnp.asarray(lc, jnp.float32), rejected_len_B=jnp.asarray(lr, jnp.float32),
        )  # fmt: skip
        return loss

    want = np_pref(pc, pr, rc, rr, loss_type, beta, ls, lc, lr)
    np.testing.assert_allclose(float(ours(pc)), want, rtol=1e-5, atol=1e-6)
    g = np.asarray(jax.grad(ours)(jnp.asarray(pc, jnp.float32)))
    g_fd = fd_grad(lambda x: np_pref(x, pr, rc, rr, loss_type, beta, ls, lc, lr), pc)
    np.testing.assert_allclose(g, g_fd, rtol=1e-4, atol=1e-6)


def test_preference_metrics():
    pc, pr = np.array([-1.0, -5.0]), np.array([-3.0, -2.0])
    rc, rr = np.array([-2.0, -2.0]), np.array([-2.0, -2.0])
    _, m = losses.preference_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), loss_type="sigmoid", beta=0.5)
    np.testing.assert_allclose(float(m["rewards/chosen"]), 0.5 * np.mean(pc - rc))
    np.testing.assert_allclose(float(m["rewards/rejected"]), 0.5 * np.mean(pr - rr))
    np.testing.assert_allclose(float(m["rewards/margins"]), 0.5 * np.mean((pc - rc) - (pr - rr)))
    assert float(m["rewards/accuracies"]) == 0.5


def test_nll_and_cbd_terms_match_numpy():
    rng = np.random.default_rng(1)
    p = rng.normal(-3, 1, size=(3, 5))
    r = rng.normal(-3, 1, size=(3, 5))
    mask = (rng.random((3, 5)) < 0.7).astype(float)
    bci = np.where(rng.random((3, 5)) < 0.5, rng.uniform(0, 30, size=(3, 5)), 0.0)
    nll, _ = losses.nll_loss(jnp.asarray(p), jnp.asarray(mask))
    np.testing.assert_allclose(float(nll), -np.sum(p * mask) / mask.sum(), rtol=1e-6)

    def ours_a(p_):
        return losses.cbd_data_loss(jnp.asarray(p_, jnp.float32), jnp.asarray(r, jnp.float32), jnp.asarray(mask),
                                    jnp.asarray(bci, jnp.float32), 0.5, 12.0)[0]  # fmt: skip

    want = np_cbd_data(p, r, mask, bci, 0.5, 12.0)
    assert want > 0 and (bci > 12.0).any() and ((bci > 0) & (bci < 12.0)).any()  # both weight regimes present
    np.testing.assert_allclose(float(ours_a(p)), want, rtol=1e-5)
    g = np.asarray(jax.grad(ours_a)(jnp.asarray(p, jnp.float32)))
    np.testing.assert_allclose(g, fd_grad(lambda x: np_cbd_data(x, r, mask, bci, 0.5, 12.0), p), rtol=1e-4, atol=1e-5)

    ent = rng.normal(-4, 1, size=(3, 5, 4))
    ref_ent = ent + rng.normal(0, 1.5, size=(3, 5, 4))  # some entries already below the reference by > margin
    pen = rng.uniform(0, 20, size=(3, 5, 4))
    valid = (rng.random((3, 5, 4)) < 0.6).astype(float)

    def ours_b(e):
        return losses.cbd_continuation_loss(jnp.asarray(e, jnp.float32), jnp.asarray(ref_ent, jnp.float32),
                                            jnp.asarray(pen, jnp.float32), jnp.asarray(valid > 0), jnp.asarray(mask),
                                            0.5, 12.0)[0]  # fmt: skip

    gap = ent - ref_ent + 0.5
    assert (gap > 0.01).any() and (gap < -0.01).any()  # active and inactive hinges both present
    np.testing.assert_allclose(float(ours_b(ent)), np_cbd_cont(ent, ref_ent, pen, valid, mask, 0.5, 12.0), rtol=1e-5)
    g = np.asarray(jax.grad(ours_b)(jnp.asarray(ent, jnp.float32)))
    want_g = fd_grad(lambda x: np_cbd_cont(x, ref_ent, pen, valid, mask, 0.5, 12.0), ent)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-5)


def test_cbd_bci_scale_must_be_positive():
    with pytest.raises(ValueError, match="cbd_bci_scale"):
        losses.bci_weights(jnp.ones(3), 0.0)


def _objective_inputs(seed=2, b=3, l=7, e=4):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(-3, 1, size=s), jnp.float32)  # noqa: E731
    mask = jnp.asarray(np.arange(l)[None, :] >= rng.integers(2, 4, size=(2 * b, 1)), jnp.float32)
    bci = jnp.asarray(np.where(rng.random((2 * b, l)) < 0.3, 10.0, 0.0), jnp.float32)
    veto = (f(2 * b, l, e), f(2 * b, l, e), jnp.asarray(rng.uniform(0, 9, (2 * b, l, e)), jnp.float32),
            jnp.asarray(rng.random((2 * b, l, e)) < 0.5))
    return f(2 * b, l), f(2 * b, l), mask, bci, veto


def test_dpo_objective_sums_terms_and_matches_numpy():
    pol, ref, mask, bci, veto = _objective_inputs()
    cfg = LossConfig(beta=0.2, rpo_alpha=0.7, cbd_data_weight=0.3, cbd_margin=1.0, cbd_cont_weight=0.05, cbd_bci_scale=6.0)
    loss, m = losses.dpo_objective(cfg, pol, ref, mask, bci, veto)
    p, r, mk = np.asarray(pol, float), np.asarray(ref, float), np.asarray(mask, float)
    sp, sr = (p * mk).sum(1), (r * mk).sum(1)
    want = np_pref(sp[0::2], sp[1::2], sr[0::2], sr[1::2], "sigmoid", 0.2, 0.0)
    want += 0.7 * -np.sum(p[0::2] * mk[0::2]) / mk[0::2].sum()
    want += 0.3 * np_cbd_data(p, r, mk, np.asarray(bci, float), 1.0, 6.0)
    want += 0.05 * np_cbd_cont(*(np.asarray(v, float) for v in veto), mk, 1.0, 6.0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    for key in ("loss/pref", "loss/nll", "loss/cbd_data", "loss/cbd_cont", "bci/mean"):
        assert key in m


def test_cbd_zero_weights_is_bitwise_dpo():
    pol, ref, mask, bci, veto = _objective_inputs(seed=3)
    plain = LossConfig(beta=0.1)
    cbd0 = dataclasses.replace(plain, cbd_data_weight=0.0, cbd_cont_weight=0.0, cbd_margin=3.0)

    def f(cfg, with_arrays):
        fn = lambda p: losses.dpo_objective(cfg, p, ref, mask, bci if with_arrays else None, veto if with_arrays else None)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(pol)

    l0, g0 = f(plain, False)
    l1, g1 = f(cbd0, True)
    assert np.asarray(l0).tobytes() == np.asarray(l1).tobytes()
    assert np.asarray(g0).tobytes() == np.asarray(g1).tobytes()


def test_token_normalisation_accumulates_exactly():
    """Two halves normalised by the global counts sum to the full-batch loss (token-weighted)."""
    pol, ref, mask, bci, veto = _objective_inputs(seed=4, b=4)
    cfg = LossConfig(beta=0.1, rpo_alpha=1.0, cbd_data_weight=0.5, cbd_cont_weight=0.1, cbd_bci_scale=4.0)
    full, _ = losses.dpo_objective(cfg, pol, ref, mask, bci, veto)
    counts = dict(num_pairs=4.0, num_tokens=float(mask.sum()), num_chosen_tokens=float(mask[0::2].sum()))
    total = 0.0
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        sel = lambda x: x[jnp.asarray(rows)]  # noqa: E731
        part, _ = losses.dpo_objective(cfg, sel(pol), sel(ref), sel(mask), sel(bci), tuple(map(sel, veto)), **counts)
        total += float(part)
    np.testing.assert_allclose(total, float(full), rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 3, 4])
@pytest.mark.parametrize("size", [0, 5])
def test_token_logprobs_match_full_log_softmax(chunk, size):
    """Every slot (size 0) or the masked tokens only in 5 slots per row: the log-softmax of the full
    logits at the scored tokens (0 elsewhere), entries too, and the gradients of their masked sum."""
    rng = np.random.default_rng(5)
    b, l, d, v, e = 2, 10, 6, 11, 3
    h = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, v, size=(b, l)), jnp.int32)
    ent = jnp.asarray(rng.integers(0, v, size=(b, l, e)), jnp.int32)
    mask = np.zeros((b, l), np.float32)
    mask[0, 4:9], mask[1, 6:10] = 1, 1  # 5 and 4 response tokens
    scored = scored_slots(tok, None, jnp.asarray(mask), size)
    lp, elp = token_logprobs(h, w, tok, scored, chunk=chunk, entry_ids_BxLxM=ent)
    full = np.asarray(jax.nn.log_softmax(h @ w, axis=-1), float)
    want = np.zeros((b, l))
    want_e = np.zeros((b, l, e))
    for i in range(b):
        for t in range(1, l):
            if size == 0 or mask[i, t]:
                want[i, t] = full[i, t - 1, int(tok[i, t])]
                want_e[i, t] = full[i, t - 1, np.asarray(ent[i, t])]
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(elp), want_e, rtol=1e-5, atol=1e-5)
    # Gradients through the gather, the rematerialized scan and the scatter equal the full computation's.
    m = jnp.asarray(mask)
    g = jax.grad(lambda h_, w_: (token_logprobs(h_, w_, tok, scored, chunk=chunk)[0] * m).sum(), argnums=(0, 1))(h, w)
    g_full = jax.grad(lambda h_, w_: (jnp.take_along_axis(jax.nn.log_softmax(h_ @ w_)[:, :-1], tok[:, 1:, None], -1)[..., 0]
                                      * m[:, 1:]).sum(), argnums=(0, 1))(h, w)  # fmt: skip
    for a, want_g in zip(g, g_full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(want_g), rtol=1e-4, atol=1e-5)


def test_veto_contexts():
    tok = jnp.asarray([[5, 6, 7, 8, 9]], jnp.int32)
    ctx, n = veto_contexts(tok, 3)
    assert np.asarray(ctx)[0].tolist() == [[0, 0, 0], [0, 0, 5], [0, 5, 6], [5, 6, 7], [6, 7, 8]]
    assert np.asarray(n)[0].tolist() == [0, 1, 2, 3, 3]


def test_bci_scale_defaults_to_the_recorded_tau():
    from types import SimpleNamespace

    from tracealign_jax.config import Config
    from tracealign_jax.training.loop import _resolve_bci_scale

    cfg = dataclasses.replace(Config(), loss=LossConfig(cbd_data_weight=0.1, cbd_cont_weight=0.1))
    store = SimpleNamespace(meta={"tau": 17.5})
    assert _resolve_bci_scale(cfg, store, {"tau": 17.5}).loss.cbd_bci_scale == 17.5
    assert _resolve_bci_scale(cfg, None, {"tau": 9.0}).loss.cbd_bci_scale == 9.0
    explicit = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, cbd_bci_scale=3.0))
    assert _resolve_bci_scale(explicit, store, {"tau": 9.0}).loss.cbd_bci_scale == 3.0
    with pytest.raises(ValueError, match="different tau"):
        _resolve_bci_scale(cfg, store, {"tau": 9.0})
    with pytest.raises(ValueError, match="cbd_bci_scale"):
        _resolve_bci_scale(cfg, SimpleNamespace(meta={}), {})
