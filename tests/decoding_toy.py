"""Toy decoding problems shared by the decoding tests: a hashed-history language model and a dict veto table.

``HashedLM``: the next-token logits depend on the WHOLE history through a running hash
h' = (h * 31 + token) mod M, looked up in a random table [M, V]. The state (h per row) must follow
its beam on reorder, so a wrong gather changes results. ``DictVetoTable`` implements the contract of
``veto.table.veto_entries`` from a Python dict {context tuple: {token: penalty}} with a
dense, obviously-correct jittable scan; ``vetoed`` is its host twin for brute force.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

M = 997


class HashedLM:
    def __init__(self, vocab: int, seed: int, eos_bias: float = 0.0, eos_id: int = 0):
        rng = np.random.default_rng(seed)
        table = rng.normal(size=(M, vocab)).astype(np.float32) * 2.0
        table[:, eos_id] += eos_bias
        self.table = table
        self.logprobs = table - np.log(np.exp(table).sum(-1, keepdims=True))
        self.vocab = vocab

    @staticmethod
    def advance(h: int, token: int) -> int:
        return (h * 31 + token) % M

    def initial_hash(self, prompt: Sequence[int]) -> int:
        h = 7
        for tok in prompt[:-1]:
            h = self.advance(h, tok)
        return h

    @staticmethod
    def tokens_to_logits(table_MxV: jax.Array, tokens_Bx1: jax.Array, h_B: jax.Array):
        """The model step over a table passed as a traced argument (one compile for every seed)."""
        h_B = (h_B * 31 + tokens_Bx1[:, 0]) % M
        return table_MxV[h_B], h_B

    def step_logprobs(self, prompt: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        h = self.initial_hash(prompt)
        for tok in [prompt[-1], *generated]:
            h = self.advance(h, tok)
        return self.logprobs[h]


@flax.struct.dataclass
class DictVetoTable:
    keys_NxC: jax.Array  # int32 right-aligned contexts, -1 left padding
    key_len_N: jax.Array
    token_N: jax.Array
    penalty_N: jax.Array
    context_len: int = flax.struct.field(pytree_node=False)

    @classmethod
    def build(cls, entries: dict[tuple[int, ...], dict[int, float]], c: int) -> "DictVetoTable":
        keys, lens, toks, pens = [], [], [], []
        for ctx, nxt in entries.items():
            assert 1 <= len(ctx) <= c
            for tok, pen in nxt.items():
                keys.append([-1] * (c - len(ctx)) + list(ctx))
                lens.append(len(ctx))
                toks.append(tok)
                pens.append(pen)
        return cls(
            jnp.asarray(keys, jnp.int32), jnp.asarray(lens, jnp.int32), jnp.asarray(toks, jnp.int32),
            jnp.asarray(pens, jnp.float32), c,
        )


def dict_lookup(table: DictVetoTable, context_BxC: jax.Array, context_len_B: jax.Array, min_prefix: int):
    """veto_entries contract: entries whose context is a suffix (length >= min_prefix) of the row's context."""
    c = table.context_len
    col_C = jnp.arange(c)
    in_key_NxC = col_C[None, :] >= c - table.key_len_N[:, None]
    same_BxNxC = (context_BxC[:, None, :] == table.keys_NxC[None]) | ~in_key_NxC[None]
    match_BxN = (
        jnp.all(same_BxNxC, axis=-1)
        & (table.key_len_N[None, :] <= context_len_B[:, None])
        & (table.key_len_N[None, :] >= min_prefix)
    )
    b = context_BxC.shape[0]
    return (
        jnp.broadcast_to(table.token_N, (b,) + table.token_N.shape),
        jnp.broadcast_to(table.penalty_N, (b,) + table.penalty_N.shape),
        match_BxN,
    )


def vetoed(entries: dict, c: int, min_prefix: int, tau: float, history: Sequence[int], token: int) -> bool:
    """Host twin: is ``token`` vetoed after running sequence ``history``?"""
    for k in range(min_prefix, min(c, len(history)) + 1):
        pen = entries.get(tuple(history[len(history) - k :]), {}).get(token)
        if pen is not None and pen > tau:
            return True
    return False


def brute_force(
    lm: HashedLM, prompt: Sequence[int], max_new: int, eos_id: int, alpha: float, k: int,
    allowed=lambda history, token: True,
) -> list[tuple[float, tuple[int, ...]]]:
    """All sequences that end in EOS or run to max_new tokens, scored logprob / ((5+len)/6)^alpha; best k."""
    results = []
    non_eos = [t for t in range(lm.vocab) if t != eos_id]

    def ok(seq: tuple[int, ...]) -> bool:
        return all(allowed(list(prompt) + list(seq[:i]), seq[i]) for i in range(len(seq)))

    for n in range(1, max_new + 1):
        for body in itertools.product(non_eos, repeat=n - 1):
            for last in [eos_id] + (non_eos if n == max_new else []):
                seq = body + (last,)
                if not ok(seq):
                    continue
                lp = sum(float(lm.step_logprobs(prompt, seq[:i])[seq[i]]) for i in range(n))
                results.append((lp / ((5.0 + n) / 6.0) ** alpha, seq))
    results.sort(key=lambda x: -x[0])
    return results[:k]


def prompt_arrays(lm: HashedLM, prompts: Sequence[Sequence[int]], c: int):
    """(initial hashes, last tokens, right-aligned contexts, context lengths) for the core functions."""
    h = jnp.asarray([lm.initial_hash(p) for p in prompts], jnp.int32)
    last = jnp.asarray([p[-1] for p in prompts], jnp.int32)
    ctx = np.zeros((len(prompts), c), np.int32)
    for i, p in enumerate(prompts):
        tail = list(p)[-c:]
        ctx[i, c - len(tail) :] = tail
    ctx_len = jnp.asarray([min(len(p), c) for p in prompts], jnp.int32)
    return h, last, jnp.asarray(ctx), ctx_len


def isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
