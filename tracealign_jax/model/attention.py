"""Grouped-query attention over slots, with causal, padding and sliding-window masking.

Queries and keys are addressed by *slot* (their column in the sequence or the cache), not by
position: a query in slot i sees key slots j <= i that hold real tokens, and with a sliding window
W only j > i - W (as ``transformers.masking_utils.sliding_window_overlay``). Left padding keeps a
row's real tokens in consecutive slots, so slot distance equals position distance.

Masked scores are set to the most negative float32 instead of -inf: a padding query whose every key
is masked then gets a uniform (finite, ignored) distribution instead of NaNs that could leak into
gradients through ``0 * NaN``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tracealign_jax import sharding


def attention_mask(
    q_slots_L: jax.Array,
    k_slots_S: jax.Array,
    k_valid_BxS: jax.Array,
    sliding_window: int | None,
) -> jax.Array:
    """bool[B, L, S]: may the query in slot ``q_slots_L[l]`` attend to key slot ``k_slots_S[s]``."""
    causal_LxS = k_slots_S[None, :] <= q_slots_L[:, None]
    if sliding_window is not None:
        causal_LxS &= k_slots_S[None, :] > q_slots_L[:, None] - sliding_window
    return causal_LxS[None, :, :] & k_valid_BxS[:, None, :]


def grouped_attention(
    q_BxLxHxE: jax.Array,
    k_BxSxGxE: jax.Array,
    v_BxSxGxE: jax.Array,
    mask_BxLxS: jax.Array,
) -> jax.Array:
    """softmax(q k^T / sqrt(E) + mask) v for H query heads sharing G kv heads -> [B, L, H, E].

    Scores and softmax are float32 whatever the compute dtype; the weighted sum is in q's dtype.
    """
    b, l, h, e = q_BxLxHxE.shape
    s, g = k_BxSxGxE.shape[1], k_BxSxGxE.shape[2]
    r = h // g
    # Query head h uses kv head h // R, as HF's repeat_kv: group G-major, R = H/G per group. The R
    # query heads of a group and the L queries are merged into one axis of R*L rows, so both dots
    # are plain batched matmuls over (B, G), which XLA's CPU backend runs faster than contracting the
    # [B, L, G, R, E] layout directly.
    q_BxGxQxE = q_BxLxHxE.reshape(b, l, g, r, e).transpose(0, 2, 3, 1, 4).reshape(b, g, r * l, e)
    k_BxGxSxE = k_BxSxGxE.transpose(0, 2, 1, 3)
    v_BxGxSxE = v_BxSxGxE.transpose(0, 2, 1, 3)
    scores_BxGxQxS = jnp.einsum(
        "bgqe,bgse->bgqs", q_BxGxQxE, k_BxGxSxE, preferred_element_type=jnp.float32
    ) * (e ** -0.5)
    scores_BxGxRxLxS = scores_BxGxQxS.reshape(b, g, r, l, s)
    scores_BxGxRxLxS = jnp.where(mask_BxLxS[:, None, None], scores_BxGxRxLxS, jnp.finfo(jnp.float32).min)
    probs_BxGxQxS = jax.nn.softmax(scores_BxGxRxLxS, axis=-1).astype(v_BxSxGxE.dtype).reshape(b, g, r * l, s)
    out_BxGxQxE = jnp.einsum("bgqs,bgse->bgqe", probs_BxGxQxS, v_BxGxSxE)
    out_BxLxHxE = out_BxGxQxE.reshape(b, g, r, l, e).transpose(0, 3, 1, 2, 4).reshape(b, l, h, e)
    return sharding.constrain(out_BxLxHxE, ("batch", "length", "heads", "head_dim"))
