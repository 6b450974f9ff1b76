"""Hugging Face PyTorch tensor names and layouts <-> our parameter paths and layouts.

PyTorch ``nn.Linear`` stores ``weight[out, in]``; we store ``[in, out]`` with heads split out
(``wq [D, H, E]``, ``wo [H, E, D]``) and every per-layer weight stacked on a leading layer axis.
Each ``TensorMap`` converts one layer's tensor both ways with reshapes and transposes only, which
NumPy performs as views: slicing the converted view of a memory-mapped file reads only the slice.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from tracealign_jax.model.config import ModelArch

Convert = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One of our parameters and its HF tensor(s).

    path: our dotted parameter path (``layers.wq``); hf_name: the HF name, with ``{layer}`` for
    stacked per-layer weights; hf_shape: the HF tensor's shape (one layer);
    to_ours / to_hf: layout conversions of one layer's tensor.
    """

    path: str
    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Convert
    to_hf: Convert

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_names(self, num_layers: int) -> list[str]:
        if not self.stacked:
            return [self.hf_name]
        return [self.hf_name.format(layer=i) for i in range(num_layers)]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.T


def tensor_maps(arch: ModelArch) -> list[TensorMap]:
    """Every parameter of ``Transformer(arch)`` with its HF counterpart, in HF file order."""
    d, f, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    h, g, e = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    attn = "model.layers.{layer}.self_attn."
    mlp = "model.layers.{layer}.mlp."

    def heads_in(n: int) -> tuple[Convert, Convert]:
        # HF [n*E, D] <-> ours [D, n, E]
        return (lambda x: x.reshape(n, e, d).transpose(2, 0, 1), lambda x: x.transpose(1, 2, 0).reshape(n * e, d))

    def heads_bias(n: int) -> tuple[Convert, Convert]:
        return (lambda x: x.reshape(n, e), lambda x: x.reshape(n * e))

    q_in, k_in = heads_in(h), heads_in(g)
    maps = [TensorMap("embed", "model.embed_tokens.weight", (v, d), _identity, _identity)]
    per_layer = [
        TensorMap("layers.attn_norm", "model.layers.{layer}.input_layernorm.weight", (d,), _identity, _identity),
        TensorMap("layers.wq", attn + "q_proj.weight", (h * e, d), *q_in),
        TensorMap("layers.wk", attn + "k_proj.weight", (g * e, d), *k_in),
        TensorMap("layers.wv", attn + "v_proj.weight", (g * e, d), *k_in),
    ]
    if arch.attention_bias:
        per_layer += [
            TensorMap("layers.bq", attn + "q_proj.bias", (h * e,), *heads_bias(h)),
            TensorMap("layers.bk", attn + "k_proj.bias", (g * e,), *heads_bias(g)),
            TensorMap("layers.bv", attn + "v_proj.bias", (g * e,), *heads_bias(g)),
        ]
    # o_proj: HF [D, H*E] <-> ours [H, E, D]
    per_layer.append(TensorMap(
        "layers.wo", attn + "o_proj.weight", (d, h * e),
        lambda x: x.reshape(d, h, e).transpose(1, 2, 0), lambda x: x.transpose(2, 0, 1).reshape(d, h * e),
    ))
    if arch.attention_out_bias:
        per_layer.append(TensorMap("layers.bo", attn + "o_proj.bias", (d,), _identity, _identity))
    per_layer += [
        TensorMap("layers.mlp_norm", "model.layers.{layer}.post_attention_layernorm.weight", (d,), _identity, _identity),
        TensorMap("layers.w_gate", mlp + "gate_proj.weight", (f, d), _transpose, _transpose),
        TensorMap("layers.w_up", mlp + "up_proj.weight", (f, d), _transpose, _transpose),
        TensorMap("layers.w_down", mlp + "down_proj.weight", (d, f), _transpose, _transpose),
    ]
    maps += per_layer
    maps.append(TensorMap("final_norm", "model.norm.weight", (d,), _identity, _identity))
    if not arch.tie_word_embeddings:
        maps.append(TensorMap("lm_head", "lm_head.weight", (v, d), _transpose, _transpose))
    return maps


# Tensors some checkpoints carry that hold no weights (recomputed buffers): skipped on load.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
