"""Policy loading for decoding (Orbax training checkpoint) and the AOT entry point (abstract lowering)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tracealign_jax import sharding
from tracealign_jax.config import load_config
from tracealign_jax.decoding import abstract_decoder
from tracealign_jax.decoding.job import load_policy

OVERRIDES = ["model.arch.vocab_size=64", "model.arch.hidden_size=16", "model.arch.intermediate_size=32",
             "model.arch.num_hidden_layers=1", "decode.batch_size=8", "decode.max_new_tokens=4"]  # fmt: skip


def test_orbax_checkpoint_loads_as_policy(tmp_path):
    from tracealign_jax.training.checkpoint import Checkpointer
    from tracealign_jax.training.state import init_train_state

    cfg = load_config("configs/tiny_cpu.yaml", OVERRIDES + [f"checkpoint.dir={tmp_path / 'ckpt'}",
                                                            "checkpoint.async_save=false"])  # fmt: skip
    mesh = sharding.build_mesh(cfg.mesh)
    rules = sharding.resolve_rules(cfg.mesh.rules)
    _, state = init_train_state(cfg, mesh, rules)
    ckpt = Checkpointer(cfg.checkpoint)
    ckpt.save(3, state, {"epoch": 0})
    ckpt.close()
    model = load_policy(cfg, tmp_path / "ckpt", mesh, rules)
    want = jax.tree.leaves(state.params)
    got = jax.tree.leaves(nnx.split(model)[1])
    assert len(want) == len(got) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(want, got))


def test_abstract_decoder_lowers_without_weights():
    # What the AOT engineer compiles: the exact jitted decode over ShapeDtypeStructs with shardings.
    cfg = load_config("configs/tiny_cpu.yaml", OVERRIDES)
    mesh = sharding.build_mesh(cfg.mesh)
    rules = sharding.resolve_rules(cfg.mesh.rules)
    dec = abstract_decoder(cfg, mesh, rules)
    args = dec.abstract_inputs(16)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(args[0]))
    lowered = dec.jitted().lower(*args)
    out = lowered.out_info
    k = cfg.decode.num_beams
    assert out.tokens_BxKxT.shape == (8, k, cfg.decode.max_new_tokens) and out.scores_BxK.dtype == jnp.float32
    assert "while" in lowered.as_text()


def test_decode_layout_restores_onto_its_own_sharding_and_decodes_the_same(tmp_path):
    # A checkpoint trained FSDP x TP (fsdp_tp) restored onto the decode layout (decode_tp: no weight over
    # fsdp) decodes the same beams, and its compiled program gathers nothing but top-k candidates (which
    # XLA's CPU backend gathers for its sort).
    from tracealign_jax.aot.hlo_report import hlo_costs
    from tracealign_jax.decoding import Decoder
    from tracealign_jax.decoding.runner import decode_layout
    from tracealign_jax.training.checkpoint import Checkpointer
    from tracealign_jax.training.state import init_train_state

    base = OVERRIDES[:3] + ["model.arch.num_hidden_layers=2", "decode.batch_size=8", "decode.max_new_tokens=6",
                            "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1",
                            f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.async_save=false"]  # fmt: skip
    train_cfg = load_config("configs/tiny_cpu.yaml", base)
    decode_cfg = load_config("configs/tiny_cpu.yaml", base + ["decode.rules=decode_tp"])
    mesh = sharding.build_mesh(train_cfg.mesh)
    _, state = init_train_state(train_cfg, mesh, sharding.resolve_rules(train_cfg.mesh.rules))
    ckpt = Checkpointer(train_cfg.checkpoint)
    ckpt.save(1, state, {"epoch": 0})
    ckpt.close()
    prompts = [[1, 5, 9, 2], [7, 3], [11, 12, 13, 14, 15, 16], [4]]
    outs, gathered = [], []
    for cfg in (train_cfg, decode_cfg):
        rules, _ = decode_layout(cfg)
        model = load_policy(cfg, tmp_path / "ckpt", mesh, rules)
        specs = {str(x.sharding.spec) for x in jax.tree.leaves(nnx.split(model)[1])}
        assert any("fsdp" in s for s in specs) == (cfg is train_cfg), specs
        dec = Decoder(model, cfg.decode, mesh=mesh, rules=rules)
        outs.append(dec.decode(prompts))
        hlo = dec.jitted().lower(*dec.abstract_inputs(16)).compile().as_text()
        sources = hlo_costs(hlo).sources
        gathered.append(sum(st.bytes for (kind, op), st in sources.items() if kind == "all-gather" and "top_k" not in op))
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.score, b.score, rtol=1e-5, atol=1e-5)
    assert gathered[0] > 0 and gathered[1] == 0, gathered
