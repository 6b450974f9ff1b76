"""tracealign-jax: trace unsafe completions to their training data and use that provenance to defend.

Conventions used across the package (stated once, here):

Shape suffixes. Array names end with their shape, from one alphabet:
  B batch (rows), L length (tokens), T response length, D model width, H query heads, G kv heads,
  R query heads per kv head (H / G), E head dim, F mlp width, V vocabulary, K beams, N spans / items,
  M veto entries of a row, S cache slots, C context tokens, Ly layers.
  e.g. ``logits_BxLxV``, ``bci_BxT``, ``tokens_BxKxL``, ``entry_ids_BxLxM``.

Units. Log-probabilities are natural logs (nats). BCI is in nats. Risks and rates are in [0, 1].
Token offsets count tokens, never bytes.

Masks. A mask is ``True``/1 where a position is real and counts; padding is ``False``/0.
Log-space sums over masked positions multiply by the mask before summing.

The boundary. ``tracealign_jax.index`` is host-side NumPy/numba. Nothing that runs under
``jax.jit`` (model, losses, training step, decoding) imports it: those see only the fixed-shape
arrays that ``tracealign_jax.provenance`` prepared ahead of time.
"""

from tracealign_jax.platform_env import cpu_xla_defaults

__version__ = "0.1.0"

cpu_xla_defaults()  # XLA CPU flags, read when JAX starts its CPU backend (platform_env)
