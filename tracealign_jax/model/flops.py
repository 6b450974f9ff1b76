"""Analytic model FLOPs of the decoder: the one formula behind the logged MFU and compile-check.

PaLM convention (Chowdhery et al. 2022, App. B), per token at context length T:
  forward  2 N + 4 x layers x heads x head_dim x T      (QK^T and AV: 2 x head_dim x T each, per head)
  training 3 x forward = 6 N + 12 x layers x heads x head_dim x T
N counts the parameters that take part in a matmul: every projection and the unembedding (the input
embedding is a gather; norms and biases are not matmuls). Causal masking is not discounted.
"""

from __future__ import annotations

from tracealign_jax.model.config import ModelArch


def matmul_params(arch: ModelArch) -> int:
    """Parameters used in a matmul per token: q/k/v/o and MLP projections of every layer, and [D, V]."""
    d, f, e = arch.hidden_size, arch.intermediate_size, arch.head_dim
    h, g = arch.num_attention_heads, arch.num_key_value_heads
    layer = d * e * (h + 2 * g) + h * e * d + 3 * d * f
    return arch.num_hidden_layers * layer + d * arch.vocab_size


def flops_per_token(arch: ModelArch, context_len: int, *, train: bool) -> float:
    """FLOPs of one token attending over ``context_len`` tokens: forward + backward, or forward only."""
    attention = 4.0 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * context_len
    forward = 2.0 * matmul_params(arch) + attention
    return 3.0 * forward if train else forward


def train_step_flops(arch: ModelArch, tokens: int, seq_len: int, *, ref_forward: bool, frozen_base: bool = False,
                     unembedded: int | None = None) -> float:  # fmt: skip
    """FLOPs of one DPO/SFT step over ``tokens`` tokens padded to ``seq_len``: policy forward + backward,
    plus a reference forward when the frozen reference runs in the step. ``frozen_base`` (LoRA): the
    backward computes activation gradients only (2 forwards in all; the rank-r adapter matmuls are
    not counted). ``unembedded``: the token slots whose logits are computed (default all; the train
    step computes them for response slots only, ``training.step.response_slots``)."""
    passes = 2.0 if frozen_base else 3.0
    per = passes * flops_per_token(arch, seq_len, train=False)
    if ref_forward:
        passes += 1.0
        per += flops_per_token(arch, seq_len, train=False)
    skipped = 0 if unembedded is None else tokens - unembedded
    return per * tokens - passes * 2.0 * arch.hidden_size * arch.vocab_size * skipped
