"""The provenance veto as the one logits hook of every decoding loop (Prov-Decode).

At each step, for all beams/rows at once, the veto table is looked up on each row's CURRENT running
sequence (last C tokens of prompt + generated so far, right-aligned), giving sparse
``(token_ids_BxE, penalties_BxE, valid_BxE)``: next tokens that would extend a high-BCI span whose
first >= ``min_prefix`` tokens the suffix already matches, with their penalties (nats; the lookup
takes the max over matching suffix lengths). A candidate is *vetoed* when its penalty exceeds tau:

  * soft: its log-prob drops by gamma x penalty;
  * hard: its log-prob becomes NEG_INF (forbidden); a row with every candidate forbidden is ended
    with the refusal by the decoding loop.

The lookup is a jittable function ``lookup(table, context_BxC, context_len_B, min_prefix)`` with the
contract of ``tracealign_jax.provenance.veto_table.veto_entries``; the table is a pytree of device
arrays passed into the jitted decode (never closed over, so a new table does not recompile).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp

from tracealign_jax.config import DecodeConfig
from tracealign_jax.decoding.step import NEG_INF, LogitsHook

VetoLookup = Callable[[Any, jax.Array, jax.Array, int], tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class VetoSpec:
    """Static veto settings (hashable: part of the compiled function's identity).

    mode: off | soft | hard. gamma: soft-veto scale (log-prob units per penalty nat).
    tau: a candidate is vetoed when its penalty > tau (nats). min_prefix: tokens of a high-BCI span
    the running suffix must already match. context_len: C, tokens of running context looked up
    (the table's ``context_len``).
    """

    mode: Literal["off", "soft", "hard"] = "off"
    gamma: float = 1.0
    tau: float = 0.0
    min_prefix: int = 1
    context_len: int = 1

    @classmethod
    def from_config(cls, cfg: DecodeConfig, context_len: int) -> "VetoSpec":
        return cls(mode=cfg.veto, gamma=cfg.gamma, tau=cfg.tau, min_prefix=cfg.min_prefix, context_len=context_len)


def default_lookup() -> VetoLookup:
    """The provenance veto-table lookup (``provenance.veto_table.veto_entries``)."""
    from tracealign_jax.provenance.veto_table import veto_entries

    return veto_entries


def make_veto_hook(spec: VetoSpec, table: Any, lookup: VetoLookup | None = None) -> LogitsHook | None:
    """The logits hook for ``spec`` (None when the veto is off). Call inside the jitted decode.

    Works on the sparse entries only (O(B x E) scatters, never a dense [B, V] penalty pass), so the
    veto's cost does not grow with the vocabulary. Duplicate entries for one token (several
    matching suffix lengths) act once, with their largest penalty.
    """
    if spec.mode == "off":
        return None
    if spec.mode not in ("soft", "hard"):
        raise ValueError(f"decode.veto: unknown mode {spec.mode!r} (expected off | soft | hard)")
    # provenance's veto_entries returns each token at most once per row; other lookups may repeat one.
    distinct = lookup is None
    lookup = default_lookup() if lookup is None else lookup

    def hook(logprobs_BxV: jax.Array, context_BxC: jax.Array, context_len_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        ids_BxE, pens_BxE, valid_BxE = lookup(table, context_BxC, context_len_B, spec.min_prefix)
        b, v = logprobs_BxV.shape
        if ids_BxE.shape[1] == 0:  # min_prefix longer than the context window: nothing can match
            return logprobs_BxV, jnp.zeros((b,), jnp.int32)
        hit_BxE = valid_BxE & (pens_BxE > spec.tau)
        ids_BxE = ids_BxE.astype(jnp.int32)
        rows_BxE = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], ids_BxE.shape)
        if spec.mode == "soft":
            # min over duplicates of (lp - gamma * pen) = lp - gamma * max pen.
            current_BxE = jnp.take_along_axis(logprobs_BxV, jnp.clip(ids_BxE, 0, v - 1), axis=1)
            new_BxE = jnp.where(hit_BxE, current_BxE - spec.gamma * pens_BxE.astype(jnp.float32), jnp.inf)
            adjusted_BxV = logprobs_BxV.at[rows_BxE, ids_BxE].min(new_BxE, mode="drop")
        else:
            adjusted_BxV = logprobs_BxV.at[rows_BxE, jnp.where(hit_BxE, ids_BxE, v)].set(NEG_INF, mode="drop")
        if distinct:
            return adjusted_BxV, jnp.sum(hit_BxE, axis=1, dtype=jnp.int32)
        # Distinct vetoed tokens per row: sort the hit ids (misses sort last as v) and count changes.
        sorted_BxE = jnp.sort(jnp.where(hit_BxE, ids_BxE, v), axis=1)
        first_BxE = jnp.concatenate([jnp.ones((b, 1), bool), sorted_BxE[:, 1:] != sorted_BxE[:, :-1]], axis=1)
        vetoes_B = jnp.sum(first_BxE & (sorted_BxE < v), axis=1, dtype=jnp.int32)
        return adjusted_BxV, vetoes_B

    return hook
