"""ModelArch parsing against transformers' own configs, refusals, and RoPE frequencies vs transformers."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from tests.hf_tiny import BASE, LLAMA3_ROPE
from tracealign_jax.model import ModelArch
from tracealign_jax.model.rope import inverse_frequencies


def test_parses_each_family_from_transformers_config():
    llama = ModelArch.from_hf_dict(LlamaConfig(**BASE, tie_word_embeddings=True).to_dict())
    assert (llama.model_type, llama.head_dim, llama.num_key_value_heads) == ("llama", 16, 2)
    assert llama.tie_word_embeddings and not llama.attention_bias and llama.sliding_window is None
    qwen = ModelArch.from_hf_dict(Qwen2Config(**BASE).to_dict())
    assert qwen.attention_bias and not qwen.attention_out_bias and qwen.sliding_window is None
    mistral = ModelArch.from_hf_dict(MistralConfig(**BASE, head_dim=24, sliding_window=7).to_dict())
    assert (mistral.head_dim, mistral.sliding_window) == (24, 7)
    biased = ModelArch.from_hf_dict(LlamaConfig(**BASE, attention_bias=True).to_dict())
    assert biased.attention_bias and biased.attention_out_bias


def test_legacy_and_v5_rope_dialects_agree():
    v5 = ModelArch.from_hf_dict(LlamaConfig(**BASE, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0).to_dict())
    legacy = dict(model_type="llama", **BASE, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), bos_token_id=1, eos_token_id=2)
    legacy["rope_scaling"]["type"] = legacy["rope_scaling"].pop("rope_type")  # the oldest spelling
    assert ModelArch.from_hf_dict(legacy) == v5
    assert v5.rope_theta == 500000.0 and v5.rope_scaling_dict["rope_type"] == "llama3"


@pytest.mark.parametrize("extra", [{}, {"rope_scaling": LLAMA3_ROPE}, {"tie_word_embeddings": True}])
def test_to_hf_dict_round_trips_through_transformers(extra):
    arch = ModelArch.from_hf_dict(LlamaConfig(**BASE, **extra).to_dict())
    d = arch.to_hf_dict()
    assert ModelArch.from_hf_dict(d) == arch
    reloaded = LlamaConfig.from_dict(d)  # what from_pretrained does with config.json
    assert ModelArch.from_hf_dict(reloaded.to_dict()) == arch
    assert d["architectures"] == ["LlamaForCausalLM"] and d["torch_dtype"] == "float32"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "unsupported architecture"),
        ({"model_type": None}, "unsupported architecture"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn' is not supported"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}}, "'dynamic' is not supported"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, "low_freq_factor"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"num_key_value_heads": 3}, "not a multiple"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ],
)
def test_refuses_unknown_or_unsupported(change, message):
    d = LlamaConfig(**BASE).to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=message):
        ModelArch.from_hf_dict(d)


def test_refuses_qwen2_sliding_window():
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelArch.from_hf_dict(Qwen2Config(**BASE, use_sliding_window=True, sliding_window=16).to_dict())


@pytest.mark.parametrize(
    "rope", [None, {"rope_type": "linear", "factor": 2.0}, LLAMA3_ROPE,
             dict(LLAMA3_ROPE, original_max_position_embeddings=64, factor=32.0)],
)
def test_inverse_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(**BASE, rope_scaling=rope, rope_theta=500000.0)
    ours = inverse_frequencies(ModelArch.from_hf_dict(config.to_dict()))
    if rope is None:
        ref = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    else:
        ref, attention_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")
        ref = ref.numpy()
        assert attention_factor == 1.0
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    if rope is not None and rope.get("original_max_position_embeddings") == 64:
        # This setting puts frequencies in all three llama3 bands: kept, smoothed and divided.
        ratio = (1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))) / ours
        assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, rope["factor"]).any()
        assert ((ratio > 1.01) & (ratio < rope["factor"] - 0.01)).any()
