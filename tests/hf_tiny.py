"""Tiny random Hugging Face checkpoints (built locally, offline) shared by the model and hf_io tests.

Weights use ``initializer_range=0.2`` and random (not 1/0) norm weights and biases, so a wrong
layout, a missing bias or a mis-scaled RoPE moves the logits by far more than the 1e-4 tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # Short original context so the 12-token test inputs cross the scaled / smoothed bands.
    "original_max_position_embeddings": 8,
}

VARIANTS = {
    "llama": ("llama", {}),
    "llama3_tied": ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "llama_bias_linear": ("llama", {"attention_bias": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": ("qwen2", {}),
    # Explicit head_dim (24 != 64/4) and a window shorter than the test sequences.
    "mistral": ("mistral", {"sliding_window": 4, "head_dim": 24}),
}


def build_torch_model(variant: str, seed: int = 0):
    """A random ``*ForCausalLM`` in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    family, extra = VARIANTS[variant]
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**BASE, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


def save_torch_model(model, out_dir: Path) -> Path:
    model.save_pretrained(out_dir)
    return out_dir


def torch_logits(model, tokens_BxL: np.ndarray, attention_mask_BxL: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {}
        if attention_mask_BxL is not None:
            kwargs["attention_mask"] = torch.tensor(attention_mask_BxL, dtype=torch.long)
        return model(torch.tensor(tokens_BxL, dtype=torch.long), **kwargs).logits.float().numpy()


def random_tokens(batch: int, length: int, vocab: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).astype(np.int32)


def numpy_model(arch, seed: int = 0):
    """A ``Transformer`` with host-generated random weights (no on-device RNG: threefry kernels take
    seconds each to compile on a loaded CPU box). Norm weights ~1 +- 0.3, biases ~0 +- 0.3."""
    import jax.numpy as jnp
    from flax import nnx

    from tracealign_jax.model import abstract_model

    graphdef, state = abstract_model(arch)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        spec, name = var.get_value(), str(path[-1])
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        if "norm" in name:
            value = 1.0 + 0.3 * noise
        elif name in ("bq", "bk", "bv", "bo"):
            value = 0.3 * noise
        else:
            value = arch.initializer_range * noise
        var.set_value(jnp.asarray(value, spec.dtype))
    return nnx.merge(graphdef, state)


def save_word_tokenizer(out_dir: Path, words: list[str], chat_template: str | None = None) -> Path:
    """A word-level fast tokenizer (whitespace split, ``<bos>`` prepended, ids = positions in
    ``["<pad>", "<eos>", "<unk>", "<bos>"] + words`` without repeats), saved to ``out_dir``: token ids a test can read off."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = list(dict.fromkeys(["<pad>", "<eos>", "<unk>", "<bos>"] + list(words)))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   bos_token="<bos>")  # fmt: skip
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return out_dir
