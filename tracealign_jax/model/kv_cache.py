"""The key/value cache for incremental decoding: one fixed-shape pytree, batch on axis 0 of every field.

Slots are written left to right; ``index`` is the next slot to write and is the same for every row
(prompts are left-padded so rows stay aligned). ``valid_BxS`` records which written slots hold real
tokens, so padding is never attended to. Beam search reorders rows with ``cache.take(idx_B)``.
The caller keeps ``index + new_tokens <= max_len`` (writes past the end are clamped by XLA's
dynamic_update_slice and would overwrite the last slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from tracealign_jax import sharding
from tracealign_jax.model.config import ModelArch

# Logical axis names of each field (used for sharding constraints and shardings).
KV_AXES = ("batch", "layers", "length", "kv_heads", "head_dim")
VALID_AXES = ("batch", "length")


class KVCache(struct.PyTreeNode):
    """Per-layer keys and values of everything decoded so far.

    k, v: [B, num_layers, S, G, E] in the compute dtype (keys already rotated by RoPE).
    valid_BxS: bool, True where a slot holds a real (non-padding) token.
    index: int32 scalar, next slot to write (slots ``[0, index)`` are filled).
    """

    k: jax.Array
    v: jax.Array
    valid_BxS: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def take(self, idx_B: jax.Array) -> "KVCache":
        """Rows ``idx_B`` of the cache (beam reordering); ``index`` is shared and kept."""
        return self.replace(k=self.k[idx_B], v=self.v[idx_B], valid_BxS=self.valid_BxS[idx_B])

    def constrain(self) -> "KVCache":
        """Applies the cache's logical sharding inside ``sharding.use_mesh`` (no-op outside)."""
        return self.replace(
            k=sharding.constrain(self.k, KV_AXES),
            v=sharding.constrain(self.v, KV_AXES),
            valid_BxS=sharding.constrain(self.valid_BxS, VALID_AXES),
        )


def init_cache(arch: ModelArch, batch: int, max_len: int, dtype: jnp.dtype | str = jnp.float32) -> KVCache:
    """An empty cache of ``max_len`` slots for ``batch`` rows (zeros, nothing valid, index 0)."""
    shape = (batch, arch.num_hidden_layers, max_len, arch.num_key_value_heads, arch.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid_BxS=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
    )


def cache_shardings(mesh: Mesh, rules: sharding.Rules) -> KVCache:
    """A KVCache-shaped pytree of NamedShardings (for jit in/out_shardings of decoding loops)."""
    return KVCache(
        k=sharding.named_sharding(mesh, rules, KV_AXES),
        v=sharding.named_sharding(mesh, rules, KV_AXES),
        valid_BxS=sharding.named_sharding(mesh, rules, VALID_AXES),
        index=sharding.named_sharding(mesh, rules, ()),
    )
