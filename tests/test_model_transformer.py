"""The decoder against itself: KV-cache decoding vs full forward, left padding vs unpadded rows,
the sliding window, remat policies and unrolled layers, hidden/unembed, and a sharded forward on 8 CPU devices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.hf_tiny import BASE, numpy_model, random_tokens
from tracealign_jax import sharding
from tracealign_jax.config import MeshConfig
from tracealign_jax.model import ModelArch, Transformer, abstract_model, init_cache, init_model, param_shardings

L = 12


def _arch(**extra) -> ModelArch:
    return ModelArch.from_hf_dict({"model_type": "llama", **BASE, **extra})


@pytest.fixture(scope="session")
def llama() -> Transformer:
    return numpy_model(_arch(), seed=1)


@pytest.fixture(scope="session")
def mistral() -> Transformer:
    # Window 4 < L, explicit head_dim: the cache must mask by slot distance exactly as the full pass.
    return numpy_model(_arch(model_type="mistral", sliding_window=4, head_dim=24), seed=2)


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, tokens, positions, valid, cache):
    return nnx.merge(graphdef, state)(tokens, positions, valid, cache)


def run(model, tokens, positions, valid=None, cache=None):
    """Jitted forward (one compile per model graph and input shape)."""
    graphdef, state = nnx.split(model)
    if valid is None:
        valid = jnp.ones(np.shape(tokens), bool)
    return _run(graphdef, state, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid), cache)


def _positions(batch: int, length: int) -> np.ndarray:
    return np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_incremental_decoding_equals_full_forward(name, request):
    model = request.getfixturevalue(name)
    tokens = random_tokens(2, L, seed=3)
    full, _ = run(model, tokens, _positions(2, L))
    cache = init_cache(model.arch, 2, 16, jnp.float32)
    pieces = []
    # Prefill 9, then one token at a time (shapes shared with the other tests: few compiles).
    for start, stop in [(0, 9)] + [(i, i + 1) for i in range(9, L)]:
        logits, cache = run(model, tokens[:, start:stop], _positions(2, L)[:, start:stop], cache=cache)
        pieces.append(logits)
    assert int(cache.index) == L and bool(cache.valid_BxS[:, :L].all()) and not bool(cache.valid_BxS[:, L:].any())
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)
    assert np.abs(np.asarray(full)).max() > 1.0  # logits are not trivially flat


def test_sliding_window_is_applied(mistral):
    tokens = random_tokens(2, L, seed=4)
    windowed, _ = run(mistral, tokens, _positions(2, L))
    graphdef, state = nnx.split(mistral)
    unwindowed = nnx.merge(graphdef, state)
    unwindowed.arch = ModelArch(**{**mistral.arch.__dict__, "sliding_window": None})
    full, _ = run(unwindowed, tokens, _positions(2, L))
    diff = np.abs(np.asarray(windowed) - np.asarray(full)).max(axis=-1)
    assert diff[:, :4].max() < 1e-5  # the first 4 tokens see everything either way
    assert diff[:, 4:].min() > 1e-3


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_left_padded_batch_matches_unpadded_rows(name, request):
    model = request.getfixturevalue(name)
    width, new = 9, 3
    rows = [random_tokens(1, n, seed=10 + n)[0] for n in (width, 4)]
    tokens = np.zeros((2, width), np.int32)
    valid = np.zeros((2, width), bool)
    positions = np.zeros((2, width), np.int32)
    for b, row in enumerate(rows):
        tokens[b, width - len(row):] = row
        valid[b, width - len(row):] = True
        positions[b, width - len(row):] = np.arange(len(row))
    padded, _ = run(model, tokens, positions, valid)
    assert np.isfinite(np.asarray(padded)).all()  # padding queries see nothing yet stay finite
    # Prefill the left-padded prompts into a cache, then decode `new` more tokens per row.
    extra = random_tokens(2, new, seed=20)
    cache = init_cache(model.arch, 2, 16, jnp.float32)
    _, cache = run(model, tokens, positions, valid, cache)
    steps = []
    for i in range(new):
        logits, cache = run(model, extra[:, i:i + 1], positions[:, -1:] + 1 + i, cache=cache)
        steps.append(np.asarray(logits[:, 0]))
    # Reference: each row alone, unpadded; right-padded into one batch (causal: the tail is inert).
    alone_tokens = np.zeros((2, L), np.int32)
    for b, row in enumerate(rows):
        alone_tokens[b, :len(row) + new] = np.concatenate([row, extra[b]])
    alone, _ = run(model, alone_tokens, _positions(2, L))
    alone = np.asarray(alone)
    for b, row in enumerate(rows):
        n = len(row)
        np.testing.assert_allclose(np.asarray(padded[b, width - n:]), alone[b, :n], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.stack([st[b] for st in steps]), alone[b, n:n + new], atol=1e-5, rtol=0)


def test_cache_take_reorders_rows(llama):
    cache = init_cache(llama.arch, 2, 16, jnp.float32)
    _, cache = run(llama, random_tokens(2, 9, seed=5), _positions(2, 9), cache=cache)
    idx = jnp.array([1, 1])
    taken = cache.take(idx)
    np.testing.assert_array_equal(taken.k, np.asarray(cache.k)[[1, 1]])
    np.testing.assert_array_equal(taken.valid_BxS, np.asarray(cache.valid_BxS)[[1, 1]])
    assert int(taken.index) == 9 and taken.k.shape == (2, 2, 16, 2, 16)
    assert np.abs(np.asarray(cache.k[0]) - np.asarray(cache.k[1])).max() > 0


def test_hidden_unembed_and_tied_matrix(llama):
    tokens, positions = jnp.asarray(random_tokens(2, L, seed=6)), jnp.asarray(_positions(2, L))
    logits, _ = run(llama, tokens, positions)
    graphdef, state = nnx.split(llama)

    @jax.jit
    def chunked(state):
        model = nnx.merge(graphdef, state)
        h, _ = model.hidden(tokens, positions)
        return model.unembed(h[:, 1:3]), model.unembedding_matrix()

    part, w_DxV = chunked(state)
    np.testing.assert_allclose(part, np.asarray(logits)[:, 1:3], atol=1e-5, rtol=0)
    assert w_DxV.shape == (64, 512)
    tied = numpy_model(_arch(tie_word_embeddings=True), seed=1)
    assert not hasattr(tied, "lm_head")
    np.testing.assert_array_equal(tied.unembedding_matrix(), np.asarray(tied.embed[...]).T)


def test_remat_policies_and_unrolled_layers_give_same_values_and_gradients(llama):
    tokens, positions = jnp.asarray(random_tokens(2, 6, seed=7)), jnp.asarray(_positions(2, 6))
    graphdefs = {remat: abstract_model(llama.arch, remat=remat)[0] for remat in ("none", "full", "dots")}
    graphdefs["unrolled"] = abstract_model(llama.arch, scan_layers=False)[0]

    @jax.jit
    def all_grads(state):  # one program, one compile
        def loss(s, graphdef):
            logits, _ = nnx.merge(graphdef, s)(tokens, positions)
            return jax.nn.logsumexp(logits, axis=-1).mean()

        return {remat: jax.value_and_grad(loss)(state, g) for remat, g in graphdefs.items()}

    results = all_grads(nnx.state(llama))
    for remat in ("full", "dots", "unrolled"):
        assert float(results[remat][0]) == pytest.approx(float(results["none"][0]), abs=1e-6)
        for a, b in zip(jax.tree.leaves(results[remat][1]), jax.tree.leaves(results["none"][1])):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_dtype(llama):
    graphdef = abstract_model(llama.arch, dtype=jnp.bfloat16)[0]
    tokens, positions = jnp.asarray(random_tokens(2, L, seed=9)), jnp.asarray(_positions(2, L))

    @jax.jit
    def forward(state):
        model = nnx.merge(graphdef, state)
        return model.hidden(tokens, positions)[0], model(tokens, positions)[0]

    h, logits = forward(nnx.state(llama))
    ref, _ = run(llama, tokens, positions)
    assert h.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
    # bf16 keeps ~3 significant digits: the argmax token mostly agrees with float32.
    assert (np.asarray(logits).argmax(-1) == np.asarray(ref).argmax(-1)).mean() > 0.8


@pytest.fixture(scope="module")
def mesh():
    return sharding.build_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


def test_abstract_model_carries_shardings(mesh):
    rules = sharding.RULE_PRESETS["fsdp_tp"]
    graphdef, abstract = abstract_model(_arch(), mesh=mesh, rules=rules)
    layers = abstract["layers"]
    assert layers["wq"].get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert abstract["embed"].get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    # A Llama-3.1-8B-shaped architecture, by shape only (nothing allocated).
    big = ModelArch.from_hf_dict(dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=8192)))
    _, big_state = abstract_model(big, param_dtype=jnp.bfloat16, mesh=mesh, rules=rules)
    sizes = [np.prod(x.shape) for x in jax.tree.leaves(big_state)]
    assert sum(sizes) == big.num_params() == 8_030_261_248


def test_sharded_forward_equals_single_device(llama, mesh):
    rules = sharding.RULE_PRESETS["fsdp_tp"]
    graphdef, state = nnx.split(llama)
    sharded_state = jax.device_put(state, param_shardings(state, mesh, rules))
    wq = sharded_state["layers"]["wq"].get_value()
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)  # embed / fsdp, heads / tensor

    tokens, positions = jnp.asarray(random_tokens(2, L, seed=8)), jnp.asarray(_positions(2, L))

    @jax.jit
    def forward(s):
        with sharding.use_mesh(mesh, rules):
            model = nnx.merge(graphdef, s)
            logits, _ = model(tokens, positions)
            cache = init_cache(model.arch, 2, 16, jnp.float32)
            _, cache = model(tokens[:, :9], positions[:, :9], cache=cache)
            step, _ = model(tokens[:, 9:10], positions[:, 9:10], cache=cache)
            return logits, step

    logits, step = forward(sharded_state)
    ref, _ = run(llama, tokens, positions)
    # A whole forward (STYLE: 1e-4 for complex computations): the sharded program gathers each layer's
    # weights and sums its tensor-parallel partial products in another order than one device (1.2e-5 seen).
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(step[:, 0], np.asarray(ref)[:, 9], atol=1e-5, rtol=0)


def test_init_model_is_born_sharded(mesh):
    rules = sharding.RULE_PRESETS["fsdp_tp"]
    arch = _arch(num_hidden_layers=1)
    model = init_model(arch, seed=3, mesh=mesh, rules=rules)
    w_up = model.layers.w_up[...]
    assert w_up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert w_up.addressable_shards[0].data.shape == (1, 32, 64)
    assert abs(float(np.std(np.asarray(w_up))) - arch.initializer_range) < 0.002
    np.testing.assert_array_equal(model.final_norm[...], np.ones(64, np.float32))


def test_one_builder_from_config_keeps_every_option(mesh):
    """``model_arch`` / ``abstract_model_from_config`` / ``build_model``: the configured architecture
    with dtype, remat and scan_layers, the same shapes and shardings as ``abstract_model`` of that arch,
    and the same weights as ``init_model`` for the same seed."""
    from tracealign_jax.config import ModelConfig
    from tracealign_jax.model import abstract_model_from_config, build_model, model_arch

    rules = sharding.RULE_PRESETS["fsdp_tp"]
    arch_dict = {"model_type": "llama", **BASE, "num_hidden_layers": 1}
    cfg = ModelConfig(arch=arch_dict, dtype="bfloat16", remat="dots", scan_layers=False)
    assert model_arch(cfg) == ModelArch.from_hf_dict(arch_dict)
    graphdef, abstract = abstract_model_from_config(cfg, mesh, rules)
    shell = nnx.merge(graphdef, abstract)
    assert (shell.remat, shell.scan_layers, shell.dtype) == ("dots", False, jnp.bfloat16)
    _, direct = abstract_model(model_arch(cfg), dtype=jnp.bfloat16, remat="dots", scan_layers=False, mesh=mesh, rules=rules)
    same = lambda a, b: (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)  # noqa: E731
    assert all(jax.tree.leaves(jax.tree.map(same, abstract, direct)))
    built = build_model(cfg, seed=3)
    assert (built.remat, built.scan_layers) == ("dots", False)
    jitted = jax.jit(lambda: nnx.split(build_model(cfg, seed=3))[1])()  # init_model jits its init too
    ref = init_model(model_arch(cfg), dtype=jnp.bfloat16, remat="dots", scan_layers=False, seed=3)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(nnx.state(ref))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
