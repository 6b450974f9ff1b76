"""What beam search, greedy and sampling share: one scoring step, the running context, the output.

Every decoding loop here drives the model through one callable,

    tokens_to_logits(tokens_Bx1 int32, state) -> (logits_BxV float32, state)

where ``state`` is any pytree whose array leaves carry the batch on axis 0 (a KV cache, the next
positions, ...); scalar leaves (a cache's write index) are shared by all rows. Beam search reorders
that state by gathering axis 0, so the convention matters.

``next_logprobs`` is THE step: call the model on each row's last token, take log-probs, and pass
them through the single logits hook (the provenance veto) together with each row's *running*
context: the last C tokens of prompt + generated-so-far, right-aligned (most recent in column C-1).
Log-probs are natural logs; an impossible candidate has log-prob ``NEG_INF`` (finite, so sums of
scores stay ordered and never produce NaN).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import flax.struct
import jax
import jax.numpy as jnp

NEG_INF = -1.0e7
"""Log-prob of a forbidden candidate. A sequence whose log-prob is below NEG_INF / 2 is invalid."""

TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


class LogitsHook(Protocol):
    """Adjusts one step's candidate scores given each row's running context (the provenance veto).

    Args: logprobs_BxV float32 (nats): the step's log-probs (greedy, sampling) or, in beam search,
    the candidate scores beam log-prob + step log-prob (the veto subtracts or forbids, so it acts
    alike on both); context_BxC int32 right-aligned, context_len_B int32 (number of real tokens at
    the right end of ``context_BxC``).
    Returns: (adjusted scores_BxV float32, vetoes_B int32: distinct candidates it penalized/forbade).
    """

    def __call__(
        self, logprobs_BxV: jax.Array, context_BxC: jax.Array, context_len_B: jax.Array
    ) -> tuple[jax.Array, jax.Array]: ...


@flax.struct.dataclass
class DecodeOutput:
    """Result of one decoding call for B prompts with K returned sequences each (K=1 for greedy/sampling).

    tokens_BxKxT: int32 generated tokens (prompt excluded), ``pad_id`` after ``lengths``;
      T = max_new_tokens + len(refusal) - 1 so a refusal always fits.
    lengths_BxK: int32 generated tokens including the final EOS / refusal tokens.
    scores_BxK: float32 ranking score: beam search log-prob / brevity_penalty(length); greedy and
      sampling: the summed log-prob. Sorted best first along K.
    logprobs_BxK: float32 summed (veto-adjusted) log-probs of the generated tokens, nats.
    valid_BxK: bool, False for slots beam search could not fill (fewer than K reachable sequences).
    refused_BxK: bool, the row ended with the configured refusal because every candidate was vetoed.
    vetoes_BxK: int32 number of (step, token) expansions of this sequence's prefixes that the veto
      penalized (soft) or forbade (hard).
    steps: int32 scalar, loop iterations run (< max_new_tokens when the search terminated early).
    """

    tokens_BxKxT: jax.Array
    lengths_BxK: jax.Array
    scores_BxK: jax.Array
    logprobs_BxK: jax.Array
    valid_BxK: jax.Array
    refused_BxK: jax.Array
    vetoes_BxK: jax.Array
    steps: jax.Array


def brevity_penalty(alpha: float, length: jax.Array) -> jax.Array:
    """The GNMT / t5x length normalizer ((5 + length) / 6) ** alpha; length in generated tokens."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def next_logprobs(
    tokens_to_logits: TokensToLogits,
    logits_hook: LogitsHook | None,
    last_tokens_B: jax.Array,
    state: Any,
    context_BxC: jax.Array,
    context_len_B: jax.Array,
) -> tuple[jax.Array, jax.Array, Any]:
    """One decoding step for B rows: (logprobs_BxV float32 after the hook, vetoes_B int32, state)."""
    logits_BxV, state = tokens_to_logits(last_tokens_B[:, None], state)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    if logits_hook is None:
        return logprobs_BxV, jnp.zeros(last_tokens_B.shape, jnp.int32), state
    logprobs_BxV, vetoes_B = logits_hook(logprobs_BxV, context_BxC, context_len_B)
    return logprobs_BxV, vetoes_B, state


def push_context(
    context_BxC: jax.Array, context_len_B: jax.Array, token_B: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Appends one token to right-aligned running contexts, dropping the oldest (shapes kept)."""
    c = context_BxC.shape[-1]
    context_BxC = jnp.concatenate([context_BxC[..., 1:], token_B[..., None].astype(context_BxC.dtype)], axis=-1)
    return context_BxC, jnp.minimum(context_len_B + 1, c)


def prompt_context(tokens_BxL: jax.Array, prompt_len_B: jax.Array, c: int) -> tuple[jax.Array, jax.Array]:
    """The running context of left-padded prompts: last ``c`` tokens (zero-filled on the left) + lengths."""
    b, length = tokens_BxL.shape
    if length >= c:
        context_BxC = tokens_BxL[:, length - c :]
    else:
        context_BxC = jnp.concatenate([jnp.zeros((b, c - length), tokens_BxL.dtype), tokens_BxL], axis=1)
    return context_BxC.astype(jnp.int32), jnp.minimum(prompt_len_B, c).astype(jnp.int32)


def write_tokens(tokens_BxT: jax.Array, start_B: jax.Array, new_BxR: jax.Array) -> jax.Array:
    """Writes ``new_BxR`` at columns ``start_B .. start_B+R-1`` of each row (columns past T dropped)."""
    t = tokens_BxT.shape[-1]
    r = new_BxR.shape[-1]
    col_T = jnp.arange(t, dtype=jnp.int32)
    offset_BxT = col_T - start_B[..., None]
    inside_BxT = (offset_BxT >= 0) & (offset_BxT < r)
    picked_BxT = jnp.take_along_axis(new_BxR, jnp.clip(offset_BxT, 0, r - 1), axis=-1)
    return jnp.where(inside_BxT, picked_BxT, tokens_BxT)


def take_beams(tree: Any, parent_BxK: jax.Array) -> Any:
    """Row b*K + k of every array leaf (ndim >= 1) becomes row b*K + parent[b, k]; scalars (a cache index)
    are shared. Each prompt's beams are gathered among themselves (a batched gather over [B, K, ...]),
    so a batch sharded over prompts reorders beams on-device: a flat row gather with global indices
    would make XLA all-gather every row of the KV cache at every step."""
    b, k = parent_BxK.shape

    def one(x: jax.Array) -> jax.Array:
        if getattr(x, "ndim", 0) < 1:
            return x
        x_BxKx = x.reshape((b, k) + x.shape[1:])
        index = parent_BxK.reshape((b, k) + (1,) * (x.ndim - 1))
        return jnp.take_along_axis(x_BxKx, index, axis=1).reshape(x.shape)

    return jax.tree.map(one, tree)


def repeat_rows(tree: Any, k: int) -> Any:
    """Repeats each row k times along axis 0 (row b -> rows b*k .. b*k+k-1) for every array leaf."""
    return jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if getattr(x, "ndim", 0) >= 1 else x, tree)
