"""``ModelArch``: the decoder architecture, read from (and written back to) a Hugging Face ``config.json``.

One decoder covers Llama 2/3/3.1, Qwen2/2.5 and Mistral; family differences are fields here:
q/k/v bias (Qwen2; Llama's ``attention_bias`` also biases o_proj), explicit ``head_dim``, RoPE
scaling (default | linear | llama3), tied embeddings and Mistral's sliding window. Anything outside
that set (another ``model_type``, yarn RoPE, an MLP bias, a non-SiLU activation, quantized weights)
is refused with a ``ValueError`` naming the field, rather than silently computing something else.

Both config dialects are read: transformers < 5 (``rope_theta`` + ``rope_scaling``) and
transformers >= 5 (``rope_parameters``); ``to_hf_dict`` writes both so either version loads it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

TokenIds = int | tuple[int, ...] | None


@dataclasses.dataclass(frozen=True)
class ModelArch:
    """Hashable (usable as static jit data) description of a Llama-family decoder.

    rope_scaling: None, or sorted ``(key, value)`` pairs of the HF rope dict without ``rope_theta``,
      always containing ``rope_type`` (use ``rope_scaling_dict``).
    attention_bias: bias on q/k/v projections; attention_out_bias: bias on o_proj (Llama only).
    sliding_window: Mistral: a query attends to the ``sliding_window`` most recent slots (itself included).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    initializer_range: float = 0.02
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type '{self.model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling) if self.rope_scaling else {"rope_type": "default"}

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.model_type]

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, e = self.hidden_size, self.intermediate_size, self.head_dim
        h, g = self.num_attention_heads, self.num_key_value_heads
        attn = d * e * (h + 2 * g) + h * e * d
        attn += (h + 2 * g) * e * self.attention_bias + d * self.attention_out_bias
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_hidden_layers * layer + d + head

    # ------------------------------------------------------------------ HF config.json <-> ModelArch
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelArch":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.json (is {path} a Hugging Face checkpoint dir?)")
        try:
            d = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: not valid JSON: {err}") from err
        try:
            return cls.from_hf_dict(d)
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from err

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelArch":
        """Parses a HF ``config.json`` dict; refuses what this decoder would compute differently."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} (architectures={archs!r}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if d.get(key) is None:
                raise ValueError(f"config field '{key}' is missing (required for model_type {model_type})")
            return d[key]

        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config field 'hidden_act'={act!r} is not supported (only silu / SwiGLU)")
        if d.get("mlp_bias"):
            raise ValueError("config field 'mlp_bias'=true is not supported (Llama-family MLPs have no bias)")
        if d.get("quantization_config"):
            raise ValueError("quantized checkpoints ('quantization_config') are not supported; use float weights")
        if model_type == "qwen2":
            if d.get("use_sliding_window"):
                raise ValueError("config field 'use_sliding_window'=true (Qwen2 per-layer sliding window) is not supported")
            layer_types = d.get("layer_types") or []
            if any(t != "full_attention" for t in layer_types):
                raise ValueError(f"config field 'layer_types'={layer_types!r}: only full_attention layers are supported")

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = d.get("head_dim") or hidden // heads
        rope_theta, rope_scaling = _parse_rope(d)
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
        elif model_type == "llama":
            qkv_bias = out_bias = bool(d.get("attention_bias", False))
        else:
            if d.get("attention_bias"):
                raise ValueError("config field 'attention_bias'=true is not supported for mistral")
            qkv_bias = out_bias = False
        window = d.get("sliding_window") if model_type == "mistral" else None
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            sliding_window=int(window) if window else None,
            initializer_range=float(d.get("initializer_range", 0.02)),
            bos_token_id=_token_ids(d.get("bos_token_id")),
            eos_token_id=_token_ids(d.get("eos_token_id")),
            pad_token_id=_token_ids(d.get("pad_token_id")),
            torch_dtype=str(dtype),
        )

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """A ``config.json`` dict that transformers 4.x and 5.x both load as this architecture."""
        dtype = torch_dtype or self.torch_dtype
        rope = self.rope_scaling_dict
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if rope["rope_type"] == "default" else rope,
            "rope_parameters": {**rope, "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": _json_ids(self.bos_token_id),
            "eos_token_id": _json_ids(self.eos_token_id),
            "pad_token_id": _json_ids(self.pad_token_id),
            "torch_dtype": dtype,
            "dtype": dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = False
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        else:
            d["use_sliding_window"] = False
            d["sliding_window"] = None
        return d


def _parse_rope(d: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling pairs) from either config dialect; refuses unsupported RoPE types."""
    params = d.get("rope_parameters")
    if isinstance(params, Mapping) and "rope_type" not in params and "type" not in params:
        raise ValueError("config field 'rope_parameters' per layer type is not supported (expected one rope dict)")
    scaling = dict(params) if isinstance(params, Mapping) else dict(d.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config field 'rope_scaling.rope_type'={rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    prf = scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise ValueError(f"config field 'partial_rotary_factor'={prf!r} is not supported (only 1.0)")
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    required = ("factor",) if rope_type == "linear" else _LLAMA3_KEYS
    for key in required:
        if scaling.get(key) is None:
            raise ValueError(f"config field 'rope_scaling.{key}' is required for rope_type {rope_type!r}")
    known = set(required) | {"attention_factor"}
    unknown = sorted(set(scaling) - known)
    if unknown:
        raise ValueError(f"config field 'rope_scaling' has unsupported keys {unknown} for rope_type {rope_type!r}")
    if scaling.get("attention_factor") not in (None, 1, 1.0):
        raise ValueError("config field 'rope_scaling.attention_factor' != 1 is not supported")
    scaling.pop("attention_factor", None)
    pairs = {"rope_type": rope_type, **{k: (int(v) if k.startswith("original") else float(v)) for k, v in scaling.items()}}
    return theta, tuple(sorted(pairs.items()))


def _token_ids(value: Any) -> TokenIds:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return int(value)


def _json_ids(value: TokenIds) -> int | list[int] | None:
    return list(value) if isinstance(value, tuple) else value
