"""Config schema: YAML + dotted overrides, unknown keys and wrong types named; shipped YAMLs parse."""

import re
from pathlib import Path

import pytest

from tracealign_jax.config import Config, ConfigError, load_config, to_dict
from tracealign_jax import sharding

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 0.001\n  steps: 5\ndata:\n  buckets: [64, 128]\n")
    cfg = load_config(path, ["train.learning_rate=2e-5", "loss.beta=0.25", "decode.veto=hard"])
    assert cfg.train.learning_rate == pytest.approx(2e-5)
    assert cfg.train.steps == 5
    assert cfg.loss.beta == 0.25
    assert cfg.data.buckets == (64, 128)
    assert cfg.decode.veto == "hard"
    assert load_config(None, []) == Config()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lerning_rate=1", "train.lerning_rate"),
        ("train.steps=ten", "train.steps: expected an integer"),
        ("decode.veto=maybe", "decode.veto"),
        ("data.buckets=7", "data.buckets: expected a list"),
        ("nosuch.key=1", "unknown config key 'nosuch'"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


def test_round_trip_through_dict():
    cfg = load_config(None, ["mesh.fsdp=2", "data.buckets=[32, 64]"])
    again = load_config(None, [f"{s}.{k}={v!r}" if isinstance(v, str) else f"{s}.{k}={v}"
                               for s, sec in to_dict(cfg).items() for k, v in sec.items()
                               if not isinstance(v, (dict, list))])
    assert again.mesh == cfg.mesh


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_parse(path):
    cfg = load_config(path)
    sharding.resolve_rules(cfg.mesh.rules)


def test_mesh_shapes_and_rules():
    cfg = load_config(None, ["mesh.fsdp=2", "mesh.tensor=2"])
    assert sharding.mesh_shape(cfg.mesh, 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="do not divide"):
        sharding.mesh_shape(load_config(None, ["mesh.fsdp=3"]).mesh, 8)
    rules = sharding.resolve_rules("fsdp_tp")
    assert sharding.logical_to_spec(("vocab", "embed"), rules) == sharding.PartitionSpec("tensor", "fsdp")
    # A mesh axis is used once per array: batch takes fsdp, so embed stays whole.
    assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == sharding.PartitionSpec(("data", "fsdp"), None, None)
    with pytest.raises(ConfigError, match="unknown mesh axis"):
        sharding.resolve_rules([["embed", "model"]])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.batch_size=6", "train.micro_batches=4"], "train.micro_batches=4 must divide train.batch_size=6"),
        (["train.micro_batches=0"], "train.micro_batches: must be an integer >= 1, got 0"),
        (["loss.cbd_cont_weight=0.1", "loss.reference=precomputed"], "use loss.reference=in_step"),
    ],
)
def test_cross_field_checks_fail_at_load(overrides, message):
    """Checks the train step once made while tracing now fail when the config loads, naming the keys."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_sft_ignores_the_reference_checks():
    cfg = load_config(None, ["train.objective=sft", "loss.cbd_cont_weight=0.1", "loss.reference=precomputed"])
    assert cfg.train.objective == "sft"
