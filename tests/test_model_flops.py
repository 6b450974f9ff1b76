"""The one FLOPs formula against a count by hand for a tiny architecture."""

from __future__ import annotations

import pytest

from tracealign_jax.model import ModelArch
from tracealign_jax.model.flops import flops_per_token, matmul_params, train_step_flops

# D 8, F 16, H 2 heads, G 1 kv head, head_dim 4, 2 layers, V 32.
ARCH = ModelArch.from_hf_dict(dict(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=16,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))  # fmt: skip


def test_matches_a_hand_count():
    # Per layer: wq 8x2x4 = 64, wk 8x1x4 = 32, wv 32, wo 2x4x8 = 64, gate/up/down 3 x 8x16 = 384 -> 576.
    # Two layers 1152, unembedding 8x32 = 256: N = 1408 (the embedding gather and norms do no matmul).
    assert matmul_params(ARCH) == 1408
    # Forward at context 10: 2N = 2816 plus attention per layer and head QK^T 2x4x10 = 80 and AV 80,
    # x 2 heads x 2 layers = 640 -> 3456. Training triples it (backward = 2 x forward).
    assert flops_per_token(ARCH, 10, train=False) == 3456
    assert flops_per_token(ARCH, 10, train=True) == 3 * 3456
    # A DPO step over 6 tokens padded to 10, with the frozen reference forward in the step.
    assert train_step_flops(ARCH, 6, 10, ref_forward=True) == 6 * (3 * 3456 + 3456)
    assert train_step_flops(ARCH, 6, 10, ref_forward=False) == 6 * 3 * 3456
    # LoRA (frozen base): forward + activation backward = 2 forwards, plus the base's reference forward.
    assert train_step_flops(ARCH, 6, 10, ref_forward=True, frozen_base=True) == 6 * 3 * 3456
    # Logits for 2 of the 6 tokens only (the responses): 4 tokens skip the unembedding, 2 x 8 x 32 = 512
    # FLOPs per forward, in each of the step's 4 (full) or 3 (LoRA) forward-equivalents.
    assert train_step_flops(ARCH, 6, 10, ref_forward=True, unembedded=2) == 6 * 4 * 3456 - 4 * 4 * 512
    assert train_step_flops(ARCH, 6, 10, ref_forward=True, frozen_base=True, unembedded=2) == 6 * 3 * 3456 - 3 * 4 * 512


def test_tied_embeddings_still_count_the_unembedding_once():
    tied = ModelArch.from_hf_dict({**ARCH.to_hf_dict(), "tie_word_embeddings": True})
    assert matmul_params(tied) == matmul_params(ARCH) == 1408


def test_the_training_metrics_and_compile_check_use_it():
    from tracealign_jax.aot import steps
    from tracealign_jax.training import loop

    assert loop.train_step_flops is train_step_flops
    assert steps.train_step_flops is train_step_flops and steps.flops_per_token is flops_per_token
    with pytest.raises(ImportError):
        from tracealign_jax.training.metrics import flops_per_token as _  # noqa: F401
