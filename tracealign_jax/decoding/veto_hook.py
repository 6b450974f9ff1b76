"""The provenance veto as the one logits hook of every decoding loop (Prov-Decode).

At each step, for all beams/rows at once, the veto table is looked up on each row's CURRENT running
sequence (last C tokens of prompt + generated so far, right-aligned), giving sparse
``(token_ids_BxM, penalties_BxM, valid_BxM)``: next tokens that would extend a high-BCI span whose
first >= ``min_prefix`` tokens the suffix already matches, with their penalties (nats; the lookup
takes the max over matching suffix lengths). A candidate is *vetoed* when its penalty exceeds tau:

  * soft: its log-prob drops by gamma x penalty;
  * hard: its log-prob becomes NEG_INF (forbidden); a row with every candidate forbidden is ended
    with the refusal by the decoding loop.

The lookup is a jittable function ``lookup(table, context_BxC, context_len_B, min_prefix)`` with the
contract of ``tracealign_jax.veto.table.veto_entries``; the table is a pytree of device
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
    """The provenance veto-table lookup (``veto.table.veto_entries``): one entry per token."""
    from tracealign_jax.veto.table import veto_entries

    return veto_entries


def step_lookup(table: Any) -> VetoLookup:
    """The lookup the hook uses by default: ``veto_table.veto_candidates`` through the table's
    ``bucket_directory`` (built here, once per decode call, outside the loop). Same slots as
    ``veto_entries`` before its per-row sort (a token may repeat across suffix lengths): the hook
    tolerates repeats, and on CPU that sort cost more than the rest of the lookup together."""
    from tracealign_jax.veto.table import bucket_directory, veto_candidates

    directory = bucket_directory(table)
    return lambda t, ctx, ctx_len, min_prefix: veto_candidates(t, ctx, ctx_len, min_prefix, directory=directory)


_PAIRWISE_MAX_M = 256
"""Up to this many entries per row, distinct hits are counted by an [M, M] comparison, else by a sort."""


def distinct_hits(ids_BxM: jax.Array, hit_BxM: jax.Array) -> jax.Array:
    """int32[B]: how many distinct token ids are among the ``hit`` entries of each row."""
    b, e = ids_BxM.shape
    if e <= _PAIRWISE_MAX_M:
        # Entry i repeats if an earlier hit j < i has the same id: one elementwise pass over [B, M, M].
        earlier_ExM = jnp.arange(e)[None, :] < jnp.arange(e)[:, None]
        same_BxExM = (ids_BxM[:, :, None] == ids_BxM[:, None, :]) & hit_BxM[:, None, :] & earlier_ExM
        return jnp.sum(hit_BxM & ~jnp.any(same_BxExM, axis=2), axis=1, dtype=jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    sorted_BxM = jnp.sort(jnp.where(hit_BxM, ids_BxM, big), axis=1)
    first_BxM = jnp.concatenate([jnp.ones((b, 1), bool), sorted_BxM[:, 1:] != sorted_BxM[:, :-1]], axis=1)
    return jnp.sum(first_BxM & (sorted_BxM != big), axis=1, dtype=jnp.int32)


def make_veto_hook(spec: VetoSpec, table: Any, lookup: VetoLookup | None = None) -> LogitsHook | None:
    """The logits hook for ``spec`` (None when the veto is off). Call inside the jitted decode.

    Works on the sparse entries only (O(B x M) scatters, never a dense [B, V] penalty pass), so the
    veto's cost does not grow with the vocabulary. Duplicate entries for one token (several
    matching suffix lengths) act once, with their largest penalty: the soft veto scatters with
    ``min`` (lp - gamma x max penalty), the hard veto forbids a token if any entry exceeds tau
    (same as its max penalty exceeding tau), and the count is of distinct tokens.
    lookup: None = ``step_lookup(table)`` (the provenance table), else any function with the contract of
    ``veto_table.veto_entries`` (repeated tokens allowed).
    """
    if spec.mode == "off":
        return None
    if spec.mode not in ("soft", "hard"):
        raise ValueError(f"decode.veto: unknown mode {spec.mode!r} (expected off | soft | hard)")
    lookup = step_lookup(table) if lookup is None else lookup

    def hook(logprobs_BxV: jax.Array, context_BxC: jax.Array, context_len_B: jax.Array) -> tuple[jax.Array, jax.Array]:
        ids_BxM, pens_BxM, valid_BxM = lookup(table, context_BxC, context_len_B, spec.min_prefix)
        b, v = logprobs_BxV.shape
        if ids_BxM.shape[1] == 0:  # min_prefix longer than the context window: nothing can match
            return logprobs_BxV, jnp.zeros((b,), jnp.int32)
        hit_BxM = valid_BxM & (pens_BxM > spec.tau)
        ids_BxM = ids_BxM.astype(jnp.int32)

        def veto(lp_BxV: jax.Array) -> tuple[jax.Array, jax.Array]:
            # Row by row (vmap): the scatters carry the batch as a batching dimension, so a pod's
            # SPMD partitioner keeps each row's update on the chips that hold the row; a scatter
            # indexed by explicit (row, token) pairs was all-gathered first (256 KiB per generated
            # token per chip on the 8B decode).
            if spec.mode == "soft":
                # min over duplicates of (lp - gamma * pen) = lp - gamma * max pen.
                current_BxM = jnp.take_along_axis(lp_BxV, jnp.clip(ids_BxM, 0, v - 1), axis=1)
                new_BxM = jnp.where(hit_BxM, current_BxM - spec.gamma * pens_BxM.astype(jnp.float32), jnp.inf)
                lp_BxV = jax.vmap(lambda lp, ids, new: lp.at[ids].min(new, mode="drop"))(lp_BxV, ids_BxM, new_BxM)
            else:
                forbid_BxM = jnp.where(hit_BxM, ids_BxM, v)
                lp_BxV = jax.vmap(lambda lp, ids: lp.at[ids].set(NEG_INF, mode="drop"))(lp_BxV, forbid_BxM)
            return lp_BxV, distinct_hits(ids_BxM, hit_BxM)

        # Most steps veto nothing anywhere in the batch (the suffixes match no context): skip the
        # scatters then. Inside the branch the entries are materialized operands, so the [M, M]
        # comparison of ``distinct_hits`` does not re-run the table gathers that produced them.
        return jax.lax.cond(jnp.any(hit_BxM), veto, lambda lp_BxV: (lp_BxV, jnp.zeros((b,), jnp.int32)),
                            logprobs_BxV)

    return hook
