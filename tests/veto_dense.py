"""Dense reference forms of the veto lookup, for tests and the veto benchmark only.

``veto_penalties`` materializes [B, V] penalties and ``apply_veto`` subtracts them from logits; the
package itself uses the sparse ``veto.table.veto_entries`` / ``veto_candidates``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tracealign_jax.veto.table import VetoTable, veto_entries


def veto_penalties(table: VetoTable, context_BxC: jax.Array, context_len_B: jax.Array, vocab_size: int,
                   min_prefix: int = 1) -> jax.Array:
    """Dense penalties ``float32[B, vocab_size]`` (0 where nothing is vetoed); jittable, static vocab_size."""
    tok, pen, valid = veto_entries(table, context_BxC, context_len_B, min_prefix)
    b = context_BxC.shape[0]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], tok.shape)
    out = jnp.zeros((b, vocab_size), jnp.float32)
    return out.at[rows, tok].max(jnp.where(valid, pen, 0.0), mode="drop")


def apply_veto(logits_BxV: jax.Array, table: VetoTable, context_BxC: jax.Array, context_len_B: jax.Array,
               gamma: float, min_prefix: int = 1) -> jax.Array:
    """``logits - gamma x penalty`` through a sparse scatter at the vetoed tokens only (jittable).

    Same result as subtracting ``gamma * veto_penalties(...)`` but never materializes a second
    [B, V] buffer: under jit with the logits donated or produced in the same step, XLA updates them
    in place, which on CPU saves the 4 x B x V bytes of memory traffic that dominate the dense form.
    """
    tok, pen, valid = veto_entries(table, context_BxC, context_len_B, min_prefix)
    rows = jnp.broadcast_to(jnp.arange(tok.shape[0])[:, None], tok.shape)
    upd = jnp.where(valid, -gamma * pen, 0.0).astype(logits_BxV.dtype)
    return logits_BxV.at[rows, tok].add(upd, mode="drop")  # tokens are unique per row among valid entries
