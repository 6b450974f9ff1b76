"""The Llama-family decoder (Llama 2/3/3.1, Qwen2/2.5, Mistral) in Flax NNX, its KV cache and shardings.

Public API::

    ModelArch.from_hf_dict(d) / ModelArch.from_hf_dir(path) / arch.to_hf_dict()
    Transformer(arch, *, dtype=jnp.float32, param_dtype=jnp.float32, remat="none", scan_layers=True,
                rngs: nnx.Rngs)
      model(tokens_BxL, positions_BxL, valid_BxL=None, cache=None) -> (logits_BxLxV float32, cache)
      model.hidden(tokens_BxL, positions_BxL, valid_BxL=None, cache=None) -> (h_BxLxD, cache)
      model.unembed(h_xD) -> logits_xV float32;  model.unembedding_matrix() -> [D, V]
    KVCache(k, v [B, Ly, S, G, E], valid_BxS bool, index int32 scalar); cache.take(idx_B)
    init_cache(arch, batch, max_len, dtype) -> KVCache;  cache_shardings(mesh, rules) -> KVCache
    param_shardings(state, mesh, rules) -> State of NamedSharding
    abstract_model(arch, *, dtype, param_dtype, remat, scan_layers, mesh=None, rules=None) -> (graphdef, abstract_state)
    init_model(arch, *, dtype, param_dtype, remat, scan_layers, seed=0, mesh=None, rules=None) -> Transformer
    shard_model(model, mesh, rules) -> Transformer
    from a run's ModelConfig: model_arch(cfg), model_options(cfg), build_model(cfg, seed),
    abstract_model_from_config(cfg, mesh, rules)
"""

from tracealign_jax.model.build import abstract_model_from_config, build_model, model_arch, model_options
from tracealign_jax.model.config import ModelArch
from tracealign_jax.model.kv_cache import KVCache, cache_shardings, init_cache
from tracealign_jax.model.partitioning import abstract_model, init_model, logical_axes, param_shardings, shard_model
from tracealign_jax.model.transformer import Transformer

__all__ = [
    "ModelArch",
    "Transformer",
    "KVCache",
    "init_cache",
    "cache_shardings",
    "param_shardings",
    "abstract_model",
    "init_model",
    "shard_model",
    "logical_axes",
    "model_arch",
    "model_options",
    "build_model",
    "abstract_model_from_config",
]
