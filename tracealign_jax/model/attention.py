"""Grouped-query attention over slots, with causal, padding and sliding-window masking.

Queries and keys are addressed by *slot* (their column in the sequence or the cache), not by
position: a query in slot i sees key slots j <= i that hold real tokens, and with a sliding window
W only j > i - W (as ``transformers.masking_utils.sliding_window_overlay``). Left padding keeps a
row's real tokens in consecutive slots, so slot distance equals position distance.

Masked scores are set to the most negative float32 instead of -inf: a padding query whose every key
is masked then gets a uniform (finite, ignored) distribution instead of NaNs that could leak into
gradients through ``0 * NaN``.

Implementations of the cache-free (training / scoring) path, ``model.attention``:
  einsum  the reference: scores [B, G, R*L, S] materialised in float32 (``grouped_attention``);
  blocked the reference per block of ``QUERY_BLOCK`` queries over only the keys up to the block's end
          (``blocked_attention``): the causal mask hides every later key, so those scores are skipped,
          not computed and masked (about half of them on long rows; with a sliding window, also the
          keys before it);
  xla     ``jax.nn.dot_product_attention(implementation='xla')`` with the same boolean mask;
  cudnn   ``jax.nn.dot_product_attention(implementation='cudnn')``: cuDNN flash attention (GPU), causal
          with per-row key counts, so padding must be at the end of each row (training batches are);
  splash  the Splash attention Pallas kernel (TPU), causal or local mask, padding as segment ids,
          under ``shard_map`` over the batch and head axes of the current mesh;
  auto    cudnn on GPU, splash on TPU, blocked elsewhere (the platform of the current mesh's devices).
Shared-prompt pair rows (``training.data``) need a mask beyond causal: einsum / blocked / xla take it
as a boolean mask (``pair_mask``), the kernels run two causal passes (``two_pass_attention``).
With a KV cache (decoding) attention is always the reference einsum over the cache slots.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tracealign_jax import sharding

IMPLEMENTATIONS = ("auto", "einsum", "blocked", "xla", "cudnn", "splash")
QUERY_BLOCK = 128  # queries per block of ``blocked_attention`` (CPU, 768 slots: 1.5x over einsum, fwd + bwd)


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


def blocked_attention(
    q_BxLxHxE: jax.Array,
    k_BxLxGxE: jax.Array,
    v_BxLxGxE: jax.Array,
    mask_BxLxL: jax.Array,
    slot_window: int | None = None,
    block: int = QUERY_BLOCK,
) -> jax.Array:
    """``grouped_attention`` over self-attention slots, per block of ``block`` queries [a, b) against
    keys [lo, b) only, lo = max(0, a - slot_window + 1) with a window in slots, else 0 -> [B, L, H, E].

    Equal to ``grouped_attention(q, k, v, mask)`` on every query that sees at least one key, for a
    mask that hides keys in later slots (causal) and, given ``slot_window``, keys ``slot_window`` or
    more slots earlier. A query that sees no key (padding) averages the block's keys instead of all
    L: a different, equally ignored value.
    """
    l = q_BxLxHxE.shape[1]
    outs = []
    for a in range(0, l, block):
        b = min(a + block, l)
        lo = 0 if slot_window is None else max(0, a - slot_window + 1)
        outs.append(grouped_attention(q_BxLxHxE[:, a:b], k_BxLxGxE[:, lo:b], v_BxLxGxE[:, lo:b], mask_BxLxL[:, a:b, lo:b]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def resolve(implementation: str) -> str:
    """``auto`` -> cudnn / splash / blocked by the platform of the current mesh (else the default backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention must be one of {' | '.join(IMPLEMENTATIONS)}, got {implementation!r}")
    if implementation != "auto":
        return implementation
    ctx = sharding.current()
    platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform, "blocked")


def self_attention_fn(
    valid_BxL: jax.Array,
    sliding_window: int | None,
    implementation: str,
    branch_BxL: jax.Array | None = None,
    positions_BxL: jax.Array | None = None,
) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """``attend(q [B, L, H, E], k, v [B, L, G, E]) -> [B, L, H, E]`` for one cache-free forward; the mask
    (or the shared-prompt view) is built here once, outside the layer loop.

    Without ``branch_BxL``: causal over slots, padding keys hidden. With it (shared-prompt pair rows
    ``[prompt | chosen | rejected | padding]``, branch 0 / 1 / 2 / -1, ``positions_BxL`` restarting at
    the prompt's end for rejected): a query sees earlier keys of the prompt and of its own response
    only, the sliding window counted in positions. einsum / blocked / xla apply that mask directly; the
    kernels (cudnn, splash), which take causal masks only, run ``two_pass_attention``.
    """
    impl = resolve(implementation)
    l = valid_BxL.shape[1]
    slots_L = jnp.arange(l)
    if impl in ("einsum", "blocked", "xla"):
        if branch_BxL is None:
            mask = attention_mask(slots_L, slots_L, valid_BxL, sliding_window)
        else:
            mask = pair_mask(valid_BxL, branch_BxL, positions_BxL, sliding_window)
        if impl == "blocked":  # pair rows count the window in positions, which are not slots: no key trimming
            return functools.partial(blocked_attention, mask_BxLxL=mask, slot_window=sliding_window if branch_BxL is None else None,
                                     block=QUERY_BLOCK)  # fmt: skip
        return functools.partial(_masked_attention, mask_BxLxS=mask, implementation=impl)
    if branch_BxL is None:
        return functools.partial(_kernel_attention, valid_BxL=valid_BxL, sliding_window=sliding_window, implementation=impl)
    return functools.partial(two_pass_attention, valid_BxL=valid_BxL, branch_BxL=branch_BxL, positions_BxL=positions_BxL,
                             sliding_window=sliding_window, implementation=impl)  # fmt: skip


def pair_mask(valid_BxL: jax.Array, branch_BxL: jax.Array, positions_BxL: jax.Array, sliding_window: int | None) -> jax.Array:
    """bool[B, L, L] of shared-prompt rows: causal in slots, real keys, key in the prompt (branch 0) or
    in the query's own response, and (window) position distance < ``sliding_window``."""
    l = valid_BxL.shape[1]
    slots_L = jnp.arange(l)
    mask = attention_mask(slots_L, slots_L, valid_BxL, None)
    mask &= (branch_BxL[:, None, :] == 0) | (branch_BxL[:, None, :] == branch_BxL[:, :, None])
    if sliding_window is not None:
        mask &= positions_BxL[:, None, :] > positions_BxL[:, :, None] - sliding_window
    return mask


def _masked_attention(q_BxLxHxE: jax.Array, k_BxSxGxE: jax.Array, v_BxSxGxE: jax.Array, *, mask_BxLxS: jax.Array,
                      implementation: str) -> jax.Array:  # fmt: skip
    if implementation == "einsum":
        return grouped_attention(q_BxLxHxE, k_BxSxGxE, v_BxSxGxE, mask_BxLxS)
    e = q_BxLxHxE.shape[-1]
    out = jax.nn.dot_product_attention(q_BxLxHxE, k_BxSxGxE, v_BxSxGxE, mask=mask_BxLxS[:, None], scale=e**-0.5,
                                       implementation="xla")  # fmt: skip
    return sharding.constrain(out, ("batch", "length", "heads", "head_dim"))


def _kernel_attention(q_BxLxHxE: jax.Array, k_BxLxGxE: jax.Array, v_BxLxGxE: jax.Array, *, valid_BxL: jax.Array,
                      sliding_window: int | None, implementation: str) -> jax.Array:  # fmt: skip
    """Causal attention through a fused kernel (cudnn | splash), or the einsum reference."""
    if implementation == "splash":
        return _splash(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, valid_BxL, sliding_window)
    if implementation != "cudnn":
        l = valid_BxL.shape[1]
        mask = attention_mask(jnp.arange(l), jnp.arange(l), valid_BxL, sliding_window)
        return _masked_attention(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, mask_BxLxS=mask, implementation=implementation)
    e = q_BxLxHxE.shape[-1]
    lengths_B = jnp.sum(valid_BxL, axis=-1, dtype=jnp.int32)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, scale=e**-0.5, is_causal=True,
                                       query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
                                       local_window_size=window, implementation="cudnn")  # fmt: skip
    return sharding.constrain(out, ("batch", "length", "heads", "head_dim"))


def causal_attention(q_BxLxHxE: jax.Array, k_BxLxGxE: jax.Array, v_BxLxGxE: jax.Array, valid_BxL: jax.Array,
                     sliding_window: int | None, implementation: str) -> jax.Array:  # fmt: skip
    """Causal self-attention (padding keys hidden) -> [B, L, H, E]: ``self_attention_fn`` applied once.
    Every implementation computes the einsum reference's function for rows padded at the end (cudnn
    requires that; the others do not)."""
    return self_attention_fn(valid_BxL, sliding_window, implementation)(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE)


def two_pass_attention(
    q_BxLxHxE: jax.Array,
    k_BxLxGxE: jax.Array,
    v_BxLxGxE: jax.Array,
    *,
    valid_BxL: jax.Array,
    branch_BxL: jax.Array,
    positions_BxL: jax.Array,
    sliding_window: int | None,
    implementation: str,
) -> jax.Array:
    """Shared-prompt rows with causal-only kernels: prompt and chosen queries see the row causally (the
    rejected tokens come after them); rejected queries attend in a second, gathered view ``[prompt |
    rejected | padding]`` where slot equals position, and their outputs are read back at view slot =
    position. q/k/v carry RoPE already. Returns [B, L, H, E]; equal to the ``pair_mask`` attention.
    """
    l = q_BxLxHxE.shape[1]
    real = valid_BxL.astype(jnp.int32)
    prompt_B = jnp.sum(real * (branch_BxL == 0), axis=-1)
    chosen_B = jnp.sum(real * (branch_BxL == 1), axis=-1)
    rejected_B = jnp.sum(real * (branch_BxL == 2), axis=-1)
    view_L = jnp.arange(l, dtype=jnp.int32)
    # view slot j holds row slot j (prompt) or j + |chosen| (rejected); beyond the pair: padding.
    src_BxL = jnp.minimum(view_L[None] + chosen_B[:, None] * (view_L[None] >= prompt_B[:, None]), l - 1)
    view_valid_BxL = view_L[None] < (prompt_B + rejected_B)[:, None]
    take = lambda x: jnp.take_along_axis(x, src_BxL.reshape(src_BxL.shape + (1,) * (x.ndim - 2)), axis=1)  # noqa: E731
    kernel = functools.partial(_kernel_attention, sliding_window=sliding_window, implementation=implementation)
    full = kernel(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, valid_BxL=valid_BxL)
    view = kernel(take(q_BxLxHxE), take(k_BxLxGxE), take(v_BxLxGxE), valid_BxL=view_valid_BxL)
    back_BxL = jnp.clip(positions_BxL, 0, l - 1)
    rejected = jnp.take_along_axis(view, back_BxL[:, :, None, None], axis=1)
    return jnp.where((branch_BxL == 2)[:, :, None, None], rejected, full)


def _splash(q_BxLxHxE: jax.Array, k_BxLxGxE: jax.Array, v_BxLxGxE: jax.Array, valid_BxL: jax.Array,
            sliding_window: int | None) -> jax.Array:  # fmt: skip
    """Splash attention (TPU Pallas): causal / local mask, padding as segment ids (real 1, pad 0).

    The kernel is per device, so it runs under ``shard_map``: rows split like the ``batch`` axis and
    heads like ``heads`` / ``kv_heads`` in the current rule table; L must be a multiple of 128.
    Off TPU the kernel runs in the Pallas interpreter (correct, slow; what the CPU tests use).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    l, h, e = q_BxLxHxE.shape[1:]
    if l % 128:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {l}")
    seg_BxL = valid_BxL.astype(jnp.int32)
    q = jnp.swapaxes(q_BxLxHxE, 1, 2) * jnp.asarray(e**-0.5, q_BxLxHxE.dtype)  # [B, H, L, E]; the kernel does not scale
    k, v = jnp.swapaxes(k_BxLxGxE, 1, 2), jnp.swapaxes(v_BxLxGxE, 1, 2)  # [B, G, L, E]
    ctx = sharding.current()
    head_shards = 1
    if ctx is not None:
        mesh, rules = ctx
        spec_h = sharding.logical_to_spec(("batch", "heads", "length", "head_dim"), rules)
        head_axes = spec_h[1] if isinstance(spec_h[1], tuple) else (spec_h[1],) if spec_h[1] else ()
        head_shards = int(np.prod([mesh.shape[a] for a in head_axes])) if head_axes else 1
    platform = ctx[0].devices.flat[0].platform if ctx is not None else jax.default_backend()
    kernel = _splash_kernel(h // head_shards, l, sliding_window, platform != "tpu")

    def local(q, k, v, seg):
        # GQA: the mha kernel maps query head i to kv head i // (H / G) when given G kv heads.
        return jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=s1, kv=s1)))(q, k, v, seg)

    if ctx is None:
        out = local(q, k, v, seg_BxL)
    else:
        spec_kv = sharding.logical_to_spec(("batch", "kv_heads", "length", "head_dim"), rules)
        spec_seg = sharding.logical_to_spec(("batch", "length"), rules)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec_h, spec_kv, spec_kv, spec_seg), out_specs=spec_h,
                            check_vma=False)(q, k, v, seg_BxL)  # fmt: skip
    return sharding.constrain(jnp.swapaxes(out, 1, 2), ("batch", "length", "heads", "head_dim"))


@functools.lru_cache(maxsize=16)
def _splash_kernel(heads: int, length: int, sliding_window: int | None, interpret: bool):
    """One Splash kernel per (local heads, length, window): the mask's block structure is static.
    Blocks of 512 (or the largest of 256 / 128 dividing L) for forward and both backward kernels;
    off TPU the Pallas interpreter runs it (slow: for tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    blk = next(b for b in (512, 256, 128) if length % b == 0)
    blocks = sa.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                           block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)  # fmt: skip

    if sliding_window is None:
        mask = sa.CausalMask(shape=(length, length))
    else:
        mask = sa.LocalMask(shape=(length, length), window_size=(sliding_window - 1, 0), offset=0)
    # Built eagerly even when first asked for inside a jit trace: the cached kernel holds arrays, and
    # tracers from one trace used in another raise UnexpectedTracerError (a second jitted function
    # with the same shapes, e.g. a step and then its gradient, did).
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask=sa.MultiHeadMask([mask] * heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)  # fmt: skip
