"""One decoder-only transformer for Llama / Qwen2 / Mistral, as a Flax NNX module.

Decoder layers are stacked: every per-layer weight has a leading ``layers`` axis and the forward
pass is one ``jax.lax.scan`` over them, so compile time does not grow with depth (an 80-layer model
compiles like a 1-layer one) and remat applies per layer through ``jax.checkpoint``. With
``scan_layers=False`` the same scan is fully unrolled (for shallow models, where it runs faster).

Every parameter is an ``nnx.Param`` whose ``logical_axes`` metadata names its dimensions
(vocab, embed, heads, kv_heads, head_dim, mlp, layers); ``tracealign_jax.model.partitioning`` turns
them into NamedShardings with the rule table of ``tracealign_jax.sharding``. Activations are
constrained by logical names with ``sharding.constrain``.

Parameter layout (paths used by ``hf_io.keymap``):
  embed [V, D]; final_norm [D]; lm_head [D, V] (absent when embeddings are tied);
  layers.attn_norm / mlp_norm [Ly, D]; layers.wq [Ly, D, H, E]; layers.wk, wv [Ly, D, G, E];
  layers.bq [Ly, H, E], bk, bv [Ly, G, E] (q/k/v bias); layers.wo [Ly, H, E, D]; layers.bo [Ly, D];
  layers.w_gate, w_up [Ly, D, F]; layers.w_down [Ly, F, D].
  With LoRA adapters attached (``model.lora.add_lora``): lora.<weight>_a [Ly, *in, r] and
  lora.<weight>_b [Ly, r, *out] for each targeted weight (``LoRAParam`` variables).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from tracealign_jax import sharding
from tracealign_jax.model.attention import attention_mask, grouped_attention, self_attention_fn
from tracealign_jax.model.config import ModelArch
from tracealign_jax.model.kv_cache import KVCache
from tracealign_jax.model.lora import lora_delta
from tracealign_jax.model.rope import apply_rope, rope_angles

Remat = Literal["none", "full", "dots"]
ACT = ("batch", "length", "embed")


def _layer_specs(arch: ModelArch) -> dict[str, tuple[tuple[int, ...], tuple[str, ...], str]]:
    """name -> (shape, logical axes, init kind) of each stacked per-layer weight."""
    n, d, f = arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size
    h, g, e = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    specs = {
        "attn_norm": ((n, d), ("layers", "embed"), "ones"),
        "wq": ((n, d, h, e), ("layers", "embed", "heads", "head_dim"), "normal"),
        "wk": ((n, d, g, e), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ((n, d, g, e), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ((n, h, e, d), ("layers", "heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ((n, d), ("layers", "embed"), "ones"),
        "w_gate": ((n, d, f), ("layers", "embed", "mlp"), "normal"),
        "w_up": ((n, d, f), ("layers", "embed", "mlp"), "normal"),
        "w_down": ((n, f, d), ("layers", "mlp", "embed"), "normal"),
    }
    if arch.attention_bias:
        specs["bq"] = ((n, h, e), ("layers", "heads", "head_dim"), "zeros")
        specs["bk"] = ((n, g, e), ("layers", "kv_heads", "head_dim"), "zeros")
        specs["bv"] = ((n, g, e), ("layers", "kv_heads", "head_dim"), "zeros")
    if arch.attention_out_bias:
        specs["bo"] = ((n, d), ("layers", "embed"), "zeros")
    return specs


def _param(key: jax.Array, shape: tuple[int, ...], axes: tuple[str, ...], kind: str, std: float, dtype: Any) -> nnx.Param:
    if kind == "ones":
        value = jnp.ones(shape, dtype)
    elif kind == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def rms_norm(x_BxLxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalize in float32, cast back, then scale by the weight."""
    with jax.named_scope("norm"):
        x32 = x_BxLxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        return weight_D.astype(x_BxLxD.dtype) * normed.astype(x_BxLxD.dtype)


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading ``layers`` axis."""

    def __init__(self, arch: ModelArch, *, param_dtype: Any, rngs: nnx.Rngs):
        for name, (shape, axes, kind) in _layer_specs(arch).items():
            setattr(self, name, _param(rngs.params(), shape, axes, kind, arch.initializer_range, param_dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}


def _project(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """Contracts the last ``n_in`` axes of x with the first ``n_in`` of w as ONE 2-D matmul.

    [B, L, *in] x [*in, *out] -> [B, L, *out] through [B*L, prod(in)] @ [prod(in), prod(out)]: the same
    numbers as the einsum, but XLA's CPU backend then emits the backward's weight- and input-gradient
    dots as plain matmuls instead of transposing 3-D/4-D operands first.
    """
    lead, k_in, k_out = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    y = x.reshape(-1, math.prod(k_in)) @ w.reshape(math.prod(k_in), -1)
    return y.reshape(lead + k_out)


def _decoder_layer(
    arch: ModelArch,
    dtype: Any,
    h_BxLxD: jax.Array,
    p: dict[str, jax.Array],
    cos_sin: tuple[jax.Array, jax.Array],
    attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    kv: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None,
    lora: tuple[dict[str, jax.Array], Any, jax.Array | None] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm decoder layer; ``attend(q, k, v)`` is the masked attention. ``kv`` = (k_all, v_all,
    layer, index) writes this step's keys and values into the full cache ``[B, Ly, S, G, E]`` at ``[:, layer, index:index+L]`` and attends over
    that layer's slots; without it attention is over the L fresh tokens only. ``lora`` = (this
    layer's adapter arrays, LoRAConfig, dropout key or None) adds ``model.lora``'s low-rank terms."""
    # FSDP: each weight is cast on its shard, then gathered whole over the `embed` (FSDP) axis for this
    # layer's matmuls. Left to itself, XLA's TPU partitioner keeps the weight sharded and rotates the
    # [B, L, .] activations through a ring of collective-permutes instead (several times the bytes).
    axes = _layer_specs(arch)
    w = {k: sharding.constrain(v.astype(dtype), tuple(None if a == "embed" else a for a in axes[k][1][1:]))
         for k, v in p.items()}  # fmt: skip

    def proj(x: jax.Array, name: str, n_in: int) -> jax.Array:
        y = _project(x, w[name], n_in)
        if lora is None or f"{name}_a" not in lora[0]:
            return y
        arrays, cfg, key = lora
        key = None if key is None else jax.random.fold_in(key, _LORA_SALT[name])
        return y + lora_delta(x, arrays[f"{name}_a"], arrays[f"{name}_b"], n_in, cfg, dtype, key)

    # Named scopes (``step_profile.PARTS``) say which part each op of a profile belongs to.
    x = rms_norm(h_BxLxD, p["attn_norm"], arch.rms_norm_eps)
    with jax.named_scope("attention_proj"):
        q = proj(x, "wq", 1)
        k = proj(x, "wk", 1)
        v = proj(x, "wv", 1)
        if arch.attention_bias:
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
    q = sharding.constrain(apply_rope(q, *cos_sin), ("batch", "length", "heads", "head_dim"))
    k = sharding.constrain(apply_rope(k, *cos_sin), ("batch", "length", "kv_heads", "head_dim"))
    v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_kv = None
    with jax.named_scope("attention"):
        if kv is not None:
            k_all, v_all, layer, index = kv
            start = (0, layer, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[:, None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[:, None].astype(v_all.dtype), start)
            new_kv = (k_all, v_all)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, axis=1, keepdims=False).astype(dtype)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, axis=1, keepdims=False).astype(dtype)
        attn = attend(q, k, v)
    with jax.named_scope("attention_proj"):
        out = proj(attn, "wo", 2)
        if arch.attention_out_bias:
            out = out + w["bo"]
    h_BxLxD = sharding.constrain(h_BxLxD + out, ACT)

    x = rms_norm(h_BxLxD, p["mlp_norm"], arch.rms_norm_eps)
    with jax.named_scope("mlp"):
        gate = sharding.constrain(proj(x, "w_gate", 1), ("batch", "length", "mlp"))
        up = sharding.constrain(proj(x, "w_up", 1), ("batch", "length", "mlp"))
        down = proj(jax.nn.silu(gate) * up, "w_down", 1)
    return sharding.constrain(h_BxLxD + down, ACT), new_kv


_LORA_SALT = {name: i for i, name in enumerate(("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))}

_REMAT_POLICIES = {
    "full": None,  # save nothing but the layer input; recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight-matmul outputs
}


class Transformer(nnx.Module):
    """Llama-family decoder. See the module docstring for the parameter layout.

    dtype: compute dtype of activations and of weights at use (float32 | bfloat16);
    param_dtype: storage dtype of the parameters; remat: none | full | dots (per decoder layer);
    scan_layers: False unrolls the layer loop (same parameters; see ``config.ModelConfig``).
    """

    def __init__(
        self,
        arch: ModelArch,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: Remat = "none",
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        if remat not in ("none", "full", "dots"):
            raise ValueError(f"remat must be none | full | dots, got {remat!r}")
        self.arch = arch
        self.dtype = jnp.dtype(dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        self.remat = remat
        self.scan_layers = scan_layers
        std = arch.initializer_range
        d, v = arch.hidden_size, arch.vocab_size
        self.embed = _param(rngs.params(), (v, d), ("vocab", "embed"), "normal", std, self.param_dtype)
        self.layers = DecoderLayers(arch, param_dtype=self.param_dtype, rngs=rngs)
        self.final_norm = _param(rngs.params(), (d,), ("embed",), "ones", std, self.param_dtype)
        if not arch.tie_word_embeddings:
            self.lm_head = _param(rngs.params(), (d, v), ("embed", "vocab"), "normal", std, self.param_dtype)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        valid_BxL: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """float32 logits [B, L, V] and the updated cache (None when called without one)."""
        h_BxLxD, cache = self.hidden(tokens_BxL, positions_BxL, valid_BxL, cache, dropout_key=dropout_key)
        return sharding.constrain(self.unembed(h_BxLxD), ("batch", "length", "vocab")), cache

    def hidden(
        self,
        tokens_BxL: jax.Array,
        positions_BxL: jax.Array,
        valid_BxL: jax.Array | None = None,
        cache: KVCache | None = None,
        *,
        dropout_key: jax.Array | None = None,
        branch_BxL: jax.Array | None = None,
        attention: str = "einsum",
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states [B, L, D] (compute dtype) and the updated cache.

        tokens_BxL int32; positions_BxL int32, per-row position of each token (0 = first real
        token); valid_BxL bool, False for padding (default: all real). With a cache the L tokens go
        to slots ``[cache.index, cache.index + L)`` and attend to every valid earlier slot.
        With adapters attached (``model.lora.add_lora``) they join every targeted projection;
        ``dropout_key`` turns on their dropout (training).
        branch_BxL int32 (no cache): the shared-prompt pair layout ``[prompt | chosen | rejected]``
        (0 / 1 / 2), where rejected tokens see the prompt and not the chosen response, and their
        positions continue from the prompt's end (``model.attention.self_attention_fn``).
        attention: the cache-free implementation (``model.attention``: auto | einsum | blocked | xla | cudnn |
        splash; see ``model.attention``); with a cache it is always the einsum reference.
        """
        arch = self.arch
        b, l = tokens_BxL.shape
        if valid_BxL is None:
            valid_BxL = jnp.ones((b, l), bool)
        # FSDP-style: all-gather the table, then gather rows locally into a batch-sharded result.
        # Gathering from the (vocab, embed)-sharded table makes XLA's SPMD partitioner fall back to
        # replicating the lookup output ("involuntary full rematerialization").
        with jax.named_scope("embed"):
            table_VxD = sharding.constrain(self.embed[...].astype(self.dtype), (None, None))  # gathered in compute dtype
            h = jnp.take(table_VxD, tokens_BxL, axis=0)
            h = sharding.constrain(h, ACT)
        with jax.named_scope("rope"):
            cos_sin = rope_angles(positions_BxL, arch)

        window = arch.sliding_window
        if cache is None:
            with jax.named_scope("attention"):  # the mask (or the kernels' views), built once for every layer
                attend = self_attention_fn(valid_BxL, window, attention, branch_BxL, positions_BxL)
            carry = (h, None, None)
        else:
            if branch_BxL is not None:
                raise ValueError("branch_BxL (shared-prompt pairs) is for cache-free forwards only")
            index = cache.index
            valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxL, (0, index))
            mask = attention_mask(index + jnp.arange(l), jnp.arange(cache.max_len), valid_BxS, window)
            attend = lambda q, k, v: grouped_attention(q, k, v, mask)  # noqa: E731
            carry = (h, cache.k, cache.v)

        adapters = getattr(self, "lora", None)
        lora_xs = None if adapters is None else adapters.arrays()
        keys = None if adapters is None or dropout_key is None else jax.random.split(dropout_key, arch.num_hidden_layers)

        def body(carry, xs):
            h, k_all, v_all = carry
            params, layer, lora_p, key = xs
            kv = None if cache is None else (k_all, v_all, layer, cache.index)
            lora = None if lora_p is None else (lora_p, adapters.cfg, key)
            h, new_kv = _decoder_layer(arch, self.dtype, h, params, cos_sin, attend, kv, lora)
            return (h, *(new_kv if new_kv is not None else (None, None))), None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
        xs = (self.layers.arrays(), jnp.arange(arch.num_hidden_layers, dtype=jnp.int32), lora_xs, keys)
        with jax.named_scope("layers"):  # what no finer part claims: per-layer weight slices, residual adds
            (h, k_all, v_all), _ = jax.lax.scan(body, carry, xs, unroll=not self.scan_layers)

        if cache is not None:
            cache = KVCache(k=k_all, v=v_all, valid_BxS=valid_BxS, index=cache.index + l).constrain()
        h = rms_norm(h, self.final_norm[...], arch.rms_norm_eps)
        return sharding.constrain(h, ACT), cache

    def unembedding_matrix(self) -> jax.Array:
        """[D, V] output projection in the parameter dtype (the embedding transposed when tied)."""
        if self.arch.tie_word_embeddings:
            return self.embed[...].T
        return self.lm_head[...]

    def unembed(self, h_xD: jax.Array) -> jax.Array:
        """float32 logits [..., V] for hidden states [..., D] (any leading shape: chunks welcome)."""
        w_DxV = self.unembedding_matrix().astype(self.dtype)
        return jnp.einsum("...d,dv->...v", h_xD.astype(self.dtype), w_DxV, preferred_element_type=jnp.float32)
