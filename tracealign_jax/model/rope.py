"""Rotary position embeddings as Hugging Face Llama defines them (rotate-half layout, not interleaved).

Frequencies follow ``transformers.modeling_rope_utils``: default, linear (positions divided by
``factor``) and llama3 (Llama 3.1's wavelength-dependent smoothing of the inverse frequencies).
Angles are computed in float32 from per-row integer positions, so left-padded rows (whose first
real token has position 0) rotate exactly like unpadded ones.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tracealign_jax.model.config import ModelArch


def inverse_frequencies(arch: ModelArch) -> np.ndarray:
    """float32[E/2] inverse frequencies (radians per position) after the configured scaling."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rope = arch.rope_scaling_dict
    if rope["rope_type"] == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif rope["rope_type"] == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`; short ones are kept; in between
        # the two are blended linearly in 1/wavelength (Llama 3.1 reference implementation).
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_angles(positions_BxL: jax.Array, arch: ModelArch) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each float32[B, L, E], for integer token positions ``positions_BxL``."""
    inv_freq = jnp.asarray(inverse_frequencies(arch))
    angles_BxLxE2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    angles_BxLxE = jnp.concatenate([angles_BxLxE2, angles_BxLxE2], axis=-1)
    return jnp.cos(angles_BxLxE), jnp.sin(angles_BxLxE)


def apply_rope(x_BxLxNxE: jax.Array, cos_BxLxE: jax.Array, sin_BxLxE: jax.Array) -> jax.Array:
    """Rotates q or k (N = heads or kv heads) in x's dtype, as HF does after casting cos/sin."""
    with jax.named_scope("rope"):
        cos = cos_BxLxE[:, :, None, :].astype(x_BxLxNxE.dtype)
        sin = sin_BxLxE[:, :, None, :].astype(x_BxLxNxE.dtype)
        half = x_BxLxNxE.shape[-1] // 2
        rotated = jnp.concatenate([-x_BxLxNxE[..., half:], x_BxLxNxE[..., :half]], axis=-1)
        return x_BxLxNxE * cos + rotated * sin
