"""Utility of a (defended) policy on benign text: token NLL / perplexity, with or without Prov-Decode.

With the veto on, the distribution the decoder actually samples from is the policy's log-softmax
adjusted by the veto hook (soft: minus gamma x penalty on vetoed tokens; hard: vetoed tokens
forbidden), renormalised. Perplexity under that distribution is the utility cost of decoding with
the veto: zero when no benign token is ever vetoed.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tracealign_jax.config import DecodeConfig


@functools.lru_cache(maxsize=8)
def _nll_fn(graphdef: Any, spec: Any, table_present: bool):
    """The jitted NLL function, one per (architecture, veto spec): policies of one architecture share it."""
    from tracealign_jax.decoding.veto_hook import make_veto_hook
    from tracealign_jax.training.logprobs import veto_contexts

    def fn(params: Any, tokens_BxL: jax.Array, valid_BxL: jax.Array, scored_BxL: jax.Array, table: Any) -> jax.Array:
        model = nnx.merge(graphdef, params)
        positions = jnp.maximum(jnp.cumsum(valid_BxL, axis=1) - 1, 0).astype(jnp.int32)
        logits_BxLxV, _ = model(tokens_BxL, positions, valid_BxL)
        lp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)  # predicts token t+1
        if table_present:
            b, l1, v = lp_BxLxV.shape
            ctx_BxLxC, ctx_len_BxL = veto_contexts(tokens_BxL, spec.context_len)
            hook = make_veto_hook(spec, table)
            adj, _ = hook(lp_BxLxV.reshape(b * l1, v), ctx_BxLxC[:, 1:].reshape(b * l1, -1),
                          ctx_len_BxL[:, 1:].reshape(b * l1))
            lp_BxLxV = jax.nn.log_softmax(adj.reshape(b, l1, v), axis=-1)
        tgt = jnp.take_along_axis(lp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
        mask = valid_BxL[:, 1:] & valid_BxL[:, :-1] & scored_BxL[:, 1:]
        return -jnp.sum(jnp.where(mask, tgt, 0.0), axis=-1)

    return jax.jit(fn)


def sequence_nll(model: Any, token_lists: Sequence[Sequence[int]], **kw: Any) -> tuple[float, int]:
    """(sum of token NLL in nats, number of predicted tokens) over ``token_lists`` (``sequence_nlls``)."""
    nll_N, count_N = sequence_nlls(model, token_lists, **kw)
    return float(nll_N.sum()), int(count_N.sum())


def sequence_nlls(model: Any, token_lists: Sequence[Sequence[int]], *, veto_table: Any = None,
                  decode_cfg: DecodeConfig | None = None, batch_size: int = 16, pad_id: int = 0,
                  score_from: Sequence[int] | None = None, length_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(NLL float64[N] in nats, predicted tokens int64[N]) per list. Token t of a list is scored when
    t >= max(1, score_from[i]) (e.g. the prompt length: only the response is scored). With
    ``veto_table`` and ``decode_cfg.veto`` != off, under the veto-adjusted distribution. Right-padded
    fixed-shape batches (length rounded up to ``length_multiple``): one compile per (architecture,
    veto setting, length)."""
    from tracealign_jax.decoding.veto_hook import VetoSpec

    use_veto = veto_table is not None and decode_cfg is not None and decode_cfg.veto != "off"
    spec = VetoSpec.from_config(decode_cfg, veto_table.context_len) if use_veto else None
    graphdef, params = nnx.split(model)
    fn = _nll_fn(graphdef, spec, use_veto)
    length = -(-max(len(t) for t in token_lists) // length_multiple) * length_multiple
    starts = [max(1, int(x)) for x in score_from] if score_from is not None else [1] * len(token_lists)
    nll_N = np.zeros(len(token_lists), np.float64)
    count_N = np.array([max(len(t) - st, 0) for t, st in zip(token_lists, starts)], np.int64)
    for s in range(0, len(token_lists), batch_size):
        chunk = token_lists[s:s + batch_size]
        tokens = np.full((batch_size, length), pad_id, np.int32)
        valid = np.zeros((batch_size, length), bool)
        scored = np.zeros((batch_size, length), bool)
        for i, t in enumerate(chunk):
            tokens[i, :len(t)] = t
            valid[i, :len(t)] = True
            scored[i, starts[s + i]:len(t)] = True
        nll_N[s:s + len(chunk)] = np.asarray(fn(params, tokens, valid, scored, veto_table if use_veto else None))[:len(chunk)]
    return nll_N, count_N
