"""The bridge from the Transformer + KV cache to the decoding loops: prefill and ``tokens_to_logits``.

Prompts arrive LEFT-padded to a bucket length L (``valid_BxL`` False on padding), so every row's
last prompt token sits in column L-1 and all rows write the cache slot ``index`` together.
``prefill`` runs the first L-1 columns through the model into a cache of L-1+max_new_tokens slots;
the decoding loop then feeds the last prompt token first (t5x style), so no forward pass is wasted
on a token that is never scored.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from tracealign_jax.model import KVCache, Transformer, init_cache


@flax.struct.dataclass
class ModelDecodeState:
    """Per-row decoding state of the model (batch axis 0, so beams reorder by gathering rows)."""

    cache: KVCache
    positions_B: jax.Array  # int32 position of the next token fed (0 = first real prompt token)


def prompt_positions(valid_BxL: jax.Array) -> jax.Array:
    """int32 per-row positions of left-padded prompts (0 at the first real token; padding clamps to 0)."""
    return jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=1) - 1, 0)


def prefill(
    model: Transformer, tokens_BxL: jax.Array, valid_BxL: jax.Array, max_new_tokens: int
) -> tuple[ModelDecodeState, jax.Array, jax.Array]:
    """Caches all prompt tokens but the last. Returns (state, last_tokens_B int32, prompt_len_B int32)."""
    b, length = tokens_BxL.shape
    positions_BxL = prompt_positions(valid_BxL)
    cache = init_cache(model.arch, b, length - 1 + max_new_tokens, model.dtype)
    if length > 1:
        _, cache = model.hidden(tokens_BxL[:, :-1], positions_BxL[:, :-1], valid_BxL[:, :-1], cache)
    state = ModelDecodeState(cache=cache, positions_B=positions_BxL[:, -1])
    return state, tokens_BxL[:, -1].astype(jnp.int32), valid_BxL.sum(axis=1).astype(jnp.int32)


def make_tokens_to_logits(model: Transformer) -> Callable[[jax.Array, Any], tuple[jax.Array, ModelDecodeState]]:
    """``tokens_to_logits(tokens_Bx1, ModelDecodeState) -> (logits_BxV float32, ModelDecodeState)``."""

    def tokens_to_logits(tokens_Bx1: jax.Array, state: ModelDecodeState) -> tuple[jax.Array, ModelDecodeState]:
        h_Bx1xD, cache = model.hidden(tokens_Bx1, state.positions_B[:, None], None, state.cache)
        logits_BxV = model.unembed(h_Bx1xD[:, -1])
        return logits_BxV, ModelDecodeState(cache=cache, positions_B=state.positions_B + 1)

    return tokens_to_logits
