"""Attention implementations against the einsum reference (values and gradients; GQA, padding, sliding
window) and the shared-prompt pair attention against a NumPy brute force of its mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tracealign_jax.model import attention
from tracealign_jax.model.attention import causal_attention, resolve, self_attention_fn, two_pass_attention

B, H, G, E = 2, 4, 2, 16


def _qkv(length: int, seed: int = 0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, length, H, E)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, length, G, E)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, length, G, E)), jnp.float32)
    return q, k, v


def _values_and_grads(impl: str, q, k, v, valid, window):
    """Output on real queries and the gradient of a nonlinear function of it w.r.t. q, k, v."""
    keep = valid[..., None, None]

    def f(q, k, v):
        return jnp.sum(jnp.sin(causal_attention(q, k, v, valid, window, impl)) * keep)

    out = jax.jit(lambda q, k, v: causal_attention(q, k, v, valid, window, impl) * keep)(q, k, v)
    return [out, *jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)]  # jitted: op-by-op was most of the test time


@pytest.mark.parametrize("impl,window", [("xla", None), ("xla", 5), ("blocked", None), ("blocked", 5), ("blocked", 12)])
def test_implementation_equals_einsum(impl, window, monkeypatch):
    """blocked with 7-query blocks over 24 slots: uneven blocks, windows shorter and longer than a block."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 7)
    q, k, v = _qkv(24)
    valid = jnp.arange(24)[None] < jnp.array([[17], [24]])  # padding at the end of row 0
    want = _values_and_grads("einsum", q, k, v, valid, window)
    got = _values_and_grads(impl, q, k, v, valid, window)
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_blocked_skips_the_keys_after_each_block():
    """The blocked path's compiled score tensors hold the lower block triangle only: 24 queries in blocks
    of 8 see 8 + 16 + 24 keys, so the largest scores block is [.., 8, 24], and none is [.., 24, 24]."""
    q, k, v = _qkv(24)
    valid = jnp.ones((B, 24), bool)
    fn = jax.jit(lambda q, k, v: attention.blocked_attention(q, k, v, attention.attention_mask(
        jnp.arange(24), jnp.arange(24), valid, None), block=8))  # fmt: skip
    hlo = fn.lower(q, k, v).compile().as_text()
    r = H // G
    assert f"f32[{B},{G},{r * 8},24]" in hlo and f"f32[{B},{G},{r * 8},8]" in hlo
    assert f"f32[{B},{G},{r * 24},24]" not in hlo


@pytest.mark.slow
def test_splash_equals_einsum_in_the_interpreter():
    """The real Splash kernel (Pallas interpreter on CPU): causal + local mask, padding as segment ids."""
    q, k, v = _qkv(128, seed=1)
    valid = jnp.arange(128)[None] < jnp.array([[100], [128]])
    want = _values_and_grads("einsum", q, k, v, valid, 37)
    got = _values_and_grads("splash", q, k, v, valid, 37)
    for a, b in zip(want, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)


def _brute_force(q, k, v, valid, branch, positions, window):
    """NumPy: query i sees key j iff j <= i, j real, j in the prompt or i's own response, and (window)
    positions[i] - positions[j] < window; GQA head h uses kv head h // (H / G)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            if not valid[b, i]:
                continue
            j = np.arange(i + 1)
            ok = valid[b, j] & ((branch[b, j] == 0) | (branch[b, j] == branch[b, i]))
            if window is not None:
                ok &= positions[b, i] - positions[b, j] < window
            j = j[ok]
            for h in range(q.shape[2]):
                g = h // (H // G)
                s = k[b, j, g] @ q[b, i, h] / np.sqrt(E)
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, j, g]
    return out


@pytest.mark.parametrize("impl,window,two_pass", [("einsum", None, False), ("einsum", 4, False), ("xla", 4, False),
                                                  ("blocked", None, False), ("blocked", 4, False),
                                                  ("einsum", 4, True), ("xla", None, True)])  # fmt: skip
def test_shared_prompt_attention_matches_brute_force(impl, window, two_pass, monkeypatch):
    """The pair mask (einsum / blocked in 6-query blocks / xla) and the two causal passes the kernels run
    (here with einsum / xla inside) against the brute force."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 6)
    length = 20
    # row 0: prompt 5, chosen 6, rejected 4, padding 5; row 1: prompt 3, chosen 2, rejected 9, padding 6
    spans = [(5, 6, 4), (3, 2, 9)]
    branch = np.full((B, length), -1, np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (B, 1))
    for b, (p, c, r) in enumerate(spans):
        branch[b, :p], branch[b, p : p + c], branch[b, p + c : p + c + r] = 0, 1, 2
        positions[b, p + c : p + c + r] = np.arange(p, p + r)
    valid = branch >= 0
    q, k, v = _qkv(length, seed=2)
    valid_j, branch_j, pos_j = jnp.asarray(valid), jnp.asarray(branch), jnp.asarray(positions)
    if two_pass:
        got = two_pass_attention(q, k, v, valid_BxL=valid_j, branch_BxL=branch_j, positions_BxL=pos_j,
                                 sliding_window=window, implementation=impl)  # fmt: skip
    else:
        got = self_attention_fn(valid_j, window, impl, branch_j, pos_j)(q, k, v)
    want = _brute_force(q, k, v, valid, branch, positions, window)
    np.testing.assert_allclose(np.asarray(got) * valid[..., None, None], want, atol=1e-5, rtol=1e-5)


def test_resolve_names_the_choice():
    assert resolve("auto") == "blocked"  # CPU (cudnn on GPU, splash on TPU)
    assert resolve("xla") == "xla"
    with pytest.raises(ValueError, match="model.attention must be one of"):
        resolve("flash")
