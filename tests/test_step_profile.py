"""Attributing a compiled step's op time to the model's named parts: op_name parsing, the real train
step's HLO, and a profiled run whose dominant part is known."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from _training_toy import toy_config, write_toy_preferences
from tracealign_jax import sharding
from tracealign_jax.config import MeshConfig
from tracealign_jax.pairs import load_pairs
from tracealign_jax.step_profile import Site, attribute, markdown_table, profile_call, site_of
from tracealign_jax.training.data import BatchStream
from tracealign_jax.training.loop import to_device_batch
from tracealign_jax.training.state import graphdef_and_abstract_params, init_train_state, state_shardings
from tracealign_jax.training.step import batch_fields, batch_shardings, make_train_step, pair_layout


def test_site_of_reads_scope_direction_and_model():
    assert site_of("jit(traced)/jvp()/closed_call/attention/jit(_where)/select_n") == Site("policy", "attention", "forward")
    assert site_of("jit(traced)/transpose(jvp(mlp))/jit(silu)/mul") == Site("policy", "mlp", "backward")
    assert site_of("jit(traced)/jvp(reference)/layers/closed_call/norm/mul") == Site("reference", "norm", "forward")
    assert site_of("jit(traced)/optimizer/add") == Site("policy", "optimizer", "forward")
    assert site_of("jit(traced)/jvp()/slice") == Site("policy", "other", "forward")
    # the innermost part wins: the projections inside the layer loop are not "layers"
    assert site_of("jit(f)/layers/while/body/attention_proj/dot_general").part == "attention_proj"


def test_every_part_of_the_train_step_is_named(tmp_path):
    """The compiled DPO step (in-step reference) holds ops of each model part, forward and backward,
    the reference's forward, the log-prob head, the loss and the optimizer."""
    path = write_toy_preferences(tmp_path / "prefs.jsonl")
    cfg = toy_config(path, tmp_path / "out")
    mesh = sharding.build_mesh(MeshConfig(data=1), jax.devices()[:1])
    rules = sharding.resolve_rules(cfg.mesh.rules)
    graphdef, state = init_train_state(cfg, mesh, rules)
    _, abs_params = graphdef_and_abstract_params(cfg, mesh, rules)
    fn = make_train_step(cfg, graphdef, mesh, rules, state_shardings(cfg, abs_params, mesh, rules))
    hb = next(BatchStream(load_pairs(cfg.data), cfg.data, cfg.train.batch_size, layout=pair_layout(cfg)))
    batch = to_device_batch({k: hb[k] for k in batch_fields(cfg)}, batch_shardings(cfg, mesh, rules))
    sites = set(attribute(fn.lower(state, batch, None).compile().as_text()).values())
    for part in ("norm", "attention_proj", "rope", "attention", "mlp", "logprobs"):
        assert Site("policy", part, "forward") in sites, part
        assert Site("policy", part, "backward") in sites, part
        assert Site("reference", part, "forward") in sites, part
        assert Site("reference", part, "backward") not in sites, part  # the reference is a constant
    assert Site("policy", "optimizer", "forward") in sites and Site("policy", "loss", "forward") in sites


def test_profile_puts_the_time_where_the_work_is():
    """A 384^3 matmul chain under "mlp" against an elementwise op under "norm": the profile gives
    "mlp" most of the op time, in both directions, and sums to its total."""

    def f(w, x):
        with jax.named_scope("mlp"):
            for _ in range(4):
                x = jnp.tanh(x @ w)
        with jax.named_scope("norm"):
            x = x * 1.5
        return jnp.sum(x)

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(384, 384)) / 20, jnp.float32)
    x = jnp.asarray(rng.normal(size=(384, 384)), jnp.float32)
    step = jax.jit(jax.grad(f, argnums=(0, 1)))
    compiled = step.lower(w, x).compile()
    jax.block_until_ready(compiled(w, x))
    prof = profile_call(compiled, lambda: jax.block_until_ready(compiled(w, x)), calls=3)
    parts = prof.by("part")
    assert prof.calls == 3 and prof.wall_ms_per_call > 0
    assert parts["mlp"] > 0.6 * prof.total_ms, parts
    assert prof.ms_per_call.get(Site("policy", "mlp", "forward"), 0) > 0
    assert prof.ms_per_call.get(Site("policy", "mlp", "backward"), 0) > 0
    assert abs(sum(parts.values()) - prof.total_ms) < 1e-9
    table = markdown_table({"toy": prof})
    assert "| policy | mlp |" in table and table.splitlines()[-1].startswith("| all | op time |")
