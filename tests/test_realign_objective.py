"""Each TRACE term against a NumPy (float64) transcription of its formula; gradients by finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_training_losses import fd_grad
from tracealign_jax.realign import objective
from tracealign_jax.realign.triage import INVERT, RETAIN, SUPPRESS


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_trace(pol, ref, kl, mask, cat, w, beta, alpha, kind, rpo=0.0):
    """The objective as the module docstring writes it, pair by pair."""
    inv = sup = 0.0
    n_conf = max(int(np.sum(cat != RETAIN)), 1)
    kl_sum, kl_n = 0.0, 0.0
    nll_sum, nll_n = 0.0, 0.0
    for i, c in enumerate(cat):
        rw, rl = pol[2 * i] - ref[2 * i], pol[2 * i + 1] - ref[2 * i + 1]
        if c == INVERT:
            m = rl - rw
            term = -np_logsig(beta * m) if kind == "logistic" else (m - 1 / (2 * beta)) ** 2
            inv += w[i] * term / n_conf
            nll_sum += w[i] * -pol[2 * i + 1]  # the anchor: y_l's NLL (its summed log-prob), weighted
            nll_n += np.sum(mask[2 * i + 1])
        elif c == SUPPRESS:
            sup += w[i] * (-np_logsig(-beta * rw) - np_logsig(-beta * rl)) / n_conf
        else:
            for r in (2 * i, 2 * i + 1):
                kl_sum += np.sum(kl[r] * mask[r])
                kl_n += np.sum(mask[r])
    return inv + sup + alpha * kl_sum / max(kl_n, 1.0) + rpo * nll_sum / max(nll_n, 1.0)


def _inputs(seed=0, b=6, l=5):
    rng = np.random.default_rng(seed)
    pol = rng.normal(-20, 3, size=2 * b)
    ref = pol + rng.normal(0, 2, size=2 * b)
    kl = rng.uniform(0, 0.5, size=(2 * b, l))
    mask = (rng.random((2 * b, l)) < 0.7).astype(float)
    cat = np.array([RETAIN, INVERT, SUPPRESS, INVERT, RETAIN, SUPPRESS][:b], np.int32)
    w = rng.uniform(0.2, 2.0, size=b)
    return pol, ref, kl, mask, cat, w


@pytest.mark.parametrize("kind,rpo", [("logistic", 0.0), ("ipo", 0.0), ("logistic", 0.7)])
def test_trace_objective_matches_numpy_with_fd_gradients(kind, rpo):
    pol, ref, kl, mask, cat, w = _inputs()
    beta, alpha = 0.3, 0.1

    def ours(p, k):
        loss, _ = objective.trace_objective(
            jnp.asarray(p, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(k, jnp.float32),
            jnp.asarray(mask, jnp.float32), jnp.asarray(cat), jnp.asarray(w, jnp.float32),
            beta=beta, alpha_kl=alpha, invert_loss=kind, rpo_alpha=rpo,
        )  # fmt: skip
        return loss

    want = np_trace(pol, ref, kl, mask, cat, w, beta, alpha, kind, rpo)
    np.testing.assert_allclose(float(ours(pol, kl)), want, rtol=1e-5)
    if rpo:  # the anchor is a real term: off, the loss differs
        assert abs(want - np_trace(pol, ref, kl, mask, cat, w, beta, alpha, kind)) > 1.0
    g_pol, g_kl = jax.grad(ours, argnums=(0, 1))(jnp.asarray(pol, jnp.float32), jnp.asarray(kl, jnp.float32))
    fd_pol = fd_grad(lambda x: np_trace(x, ref, kl, mask, cat, w, beta, alpha, kind, rpo), pol)
    fd_kl = fd_grad(lambda x: np_trace(pol, ref, x, mask, cat, w, beta, alpha, kind, rpo), kl)
    np.testing.assert_allclose(np.asarray(g_pol), fd_pol, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_kl), fd_kl, rtol=1e-4, atol=1e-7)
    # retained pairs carry no preference gradient; KL counts only retained rows
    assert np.all(np.asarray(g_pol)[np.repeat(cat == RETAIN, 2)] == 0)
    assert np.all(np.asarray(g_kl)[np.repeat(cat != RETAIN, 2)] == 0)


def test_invert_and_npo_terms_match_numpy():
    rng = np.random.default_rng(1)
    cw, cl = rng.normal(0, 4, size=7), rng.normal(0, 4, size=7)
    got = objective.invert_losses(jnp.asarray(cw), jnp.asarray(cl), beta=0.3)
    np.testing.assert_allclose(np.asarray(got), -np_logsig(0.3 * (cl - cw)), rtol=1e-6)
    got = objective.invert_losses(jnp.asarray(cw), jnp.asarray(cl), beta=0.3, kind="ipo")
    np.testing.assert_allclose(np.asarray(got), (cl - cw - 1 / 0.6) ** 2, rtol=1e-5)
    got = objective.dual_npo_losses(jnp.asarray(cw), jnp.asarray(cl), beta=0.3)
    np.testing.assert_allclose(np.asarray(got), -np_logsig(-0.3 * cw) - np_logsig(-0.3 * cl), rtol=1e-6)
    with pytest.raises(ValueError, match="invert loss"):
        objective.invert_losses(jnp.asarray(cw), jnp.asarray(cl), beta=0.3, kind="hinge")


def test_token_kl_matches_numpy_with_fd_gradient():
    rng = np.random.default_rng(2)
    zr, zp = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 3, 6))

    def np_kl(zp_):
        lr, lp = np_log_softmax(zr), np_log_softmax(zp_)
        return np.sum(np.exp(lr) * (lr - lp), axis=-1)

    def ours(zp_):
        return objective.token_kl(jax.nn.log_softmax(jnp.asarray(zr, jnp.float32)), jax.nn.log_softmax(zp_))

    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(zp, jnp.float32))), np_kl(zp), rtol=1e-5, atol=1e-7)
    assert np.all(np_kl(zp) > 0)
    coef = rng.normal(size=(2, 3))  # a random projection of the KL field, so each position's gradient counts
    g = jax.grad(lambda z: jnp.sum(ours(z) * coef))(jnp.asarray(zp, jnp.float32))
    np.testing.assert_allclose(np.asarray(g), fd_grad(lambda z: np.sum(np_kl(z) * coef), zp), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(zr, jnp.float32))), 0.0, atol=1e-6)  # KL(p || p) = 0


@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("size", [0, 4])
def test_trace_token_terms_match_full_vocabulary_numpy(chunk, size):
    """Both models' token log-probs and KL(ref || policy) from one logits block each, on every slot
    (size 0) or the masked tokens only (4 slots per row), against NumPy; gradients by finite differences."""
    from tracealign_jax.training.logprobs import scored_slots

    rng = np.random.default_rng(3)
    b, l, d, v = 2, 7, 5, 9
    hp, hr = rng.normal(size=(b, l, d)), rng.normal(size=(b, l, d))
    wp, wr = rng.normal(size=(d, v)), rng.normal(size=(d, v))
    tok = rng.integers(0, v, size=(b, l))
    mask = np.zeros((b, l))
    mask[0, 3:7], mask[1, 5:7] = 1, 1
    keep = np.pad(np.ones((b, l - 1)), ((0, 0), (1, 0))) * (mask if size else 1)  # scored slots, token frame

    def np_terms(hp_):
        lp, lr = np_log_softmax(hp_ @ wp), np_log_softmax(hr @ wr)
        kl = np.sum(np.exp(lr) * (lr - lp), axis=-1)
        at = lambda x: np.take_along_axis(x[:, :-1], tok[:, 1:, None], -1)[..., 0]  # noqa: E731
        shift = lambda x: np.pad(x, ((0, 0), (1, 0))) * keep  # noqa: E731
        return shift(at(lp)), shift(at(lr)), shift(kl[:, :-1])

    scored = scored_slots(jnp.asarray(tok, jnp.int32), None, jnp.asarray(mask, jnp.float32), size)

    def ours(hp_):
        return objective.trace_token_terms(hp_, jnp.asarray(wp, jnp.float32), jnp.asarray(hr, jnp.float32),
                                           jnp.asarray(wr, jnp.float32), jnp.asarray(tok, jnp.int32), scored, chunk=chunk)  # fmt: skip

    for got, want in zip(ours(jnp.asarray(hp, jnp.float32)), np_terms(hp)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    coef = rng.normal(size=(3, b, l))
    proj = lambda terms: sum(jnp.sum(t * c) for t, c in zip(terms, coef))  # noqa: E731
    g = jax.grad(lambda h: proj(ours(h)))(jnp.asarray(hp, jnp.float32))
    fd = fd_grad(lambda h: sum(np.sum(t * c) for t, c in zip(np_terms(h), coef)), hp)
    np.testing.assert_allclose(np.asarray(g), fd, rtol=1e-4, atol=1e-5)


def test_global_counts_make_halves_add_up():
    pol, ref, kl, mask, cat, w = _inputs(seed=4)
    args = lambda sl: [jnp.asarray(x[sl], jnp.float32) for x in (pol, ref, kl, mask)]  # noqa: E731
    full, _ = objective.trace_objective(*args(slice(None)), jnp.asarray(cat), jnp.asarray(w, jnp.float32), rpo_alpha=0.5)
    counts = dict(num_conflicts=float(np.sum(cat != RETAIN)), num_retained_tokens=float(np.sum(mask * np.repeat(cat == RETAIN, 2)[:, None])),
                  num_inverted_tokens=float(np.sum(mask[1::2][cat == INVERT])), rpo_alpha=0.5)
    total = 0.0
    for lo, hi in ((0, 3), (3, 6)):
        part, _ = objective.trace_objective(*args(slice(2 * lo, 2 * hi)), jnp.asarray(cat[lo:hi]),
                                            jnp.asarray(w[lo:hi], jnp.float32), **counts)  # fmt: skip
        total += float(part)
    np.testing.assert_allclose(total, float(full), rtol=1e-5)


def test_metrics_report_each_category():
    pol, ref, kl, mask, cat, w = _inputs(seed=5)
    _, m = objective.trace_objective(*(jnp.asarray(x, jnp.float32) for x in (pol, ref, kl, mask)), jnp.asarray(cat),
                                     jnp.asarray(w, jnp.float32))  # fmt: skip
    assert (float(m["pairs/retain"]), float(m["pairs/invert"]), float(m["pairs/suppress"])) == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(float(m["weight/invert"]), w[cat == INVERT].sum(), rtol=1e-6)
    np.testing.assert_allclose(float(m["weight/suppress"]), w[cat == SUPPRESS].sum(), rtol=1e-6)
    want = 0.1 * float(m["loss/kl"]) + float(m["loss/invert"]) + float(m["loss/suppress"])
    np.testing.assert_allclose(float(m["loss/total"]), want, rtol=1e-6)
