"""Config faults (issue 17 items 7, 13): values the types allow but a run cannot use are refused naming
the key; typos under model.arch are refused; an error from --set names the override, not the YAML."""

from __future__ import annotations

import pytest

from tracealign_jax.config import ConfigError, load_config


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=0", "train.batch_size: must be an integer >= 1, got 0"),
        ("train.steps=-3", "train.steps: must be an integer >= 1, got -3"),
        ("train.micro_batches=0", "train.micro_batches"),
        ("data.buckets=[]", "data.buckets: must be a non-empty list"),
        ("data.max_response_len=0", "data.max_response_len"),
        ("decode.num_beams=0", "decode.num_beams"),
        ("decode.top_p=1.5", "decode.top_p: must be in (0, 1]"),
        ("decode.temperature=0", "decode.temperature"),
        ("loss.beta=0", "loss.beta: must be > 0"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing"),
        ("mesh.tensor=0", "mesh.tensor"),
        ("provenance.target_fpr=0", "provenance.target_fpr"),
        ("provenance.max_span=2", "provenance.max_span: 2 is below min_span"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
        ("decode.rules=decode_fast", "decode.rules: unknown preset 'decode_fast'"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_override(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert str(err.value).startswith(f"--set {override}: ")


def test_model_arch_typo_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model\.arch\.rms_norm_epsilon.*did you mean 'rms_norm_eps'"):
        load_config(None, ["model.arch={model_type: llama, vocab_size: 64, rms_norm_epsilon: 1.0e-6}"])
    cfg = load_config(None, ["model.arch={model_type: llama, vocab_size: 64, rms_norm_eps: 1.0e-6}"])
    assert cfg.model.arch["rms_norm_eps"] == 1e-6


def test_errors_name_the_yaml_file_or_the_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  steps: 10\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: train\.batch_size: must be"):
        load_config(path, ["train.steps=5"])
    # the override fixes the file's bad value: accepted
    assert load_config(path, ["train.batch_size=4"]).train.batch_size == 4
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  steps: 10\n")
    with pytest.raises(ConfigError, match=r"^--set train\.steps=ten: train\.steps: expected an integer"):
        load_config(good, ["train.steps=ten"])
    with pytest.raises(ConfigError, match=r"^--set train\.lerning_rate=1: unknown config key 'train\.lerning_rate'.*"
                                          r"did you mean 'learning_rate'"):
        load_config(good, ["train.lerning_rate=1"])


@pytest.mark.parametrize("word", ["off", "Off", "no"])
def test_yaml_booleans_for_off_choices(word):
    # YAML 1.1 reads `off` as False: `--set decode.veto=off` (and `--veto off`) must still mean "off"
    assert load_config(None, [f"decode.veto={word}"]).decode.veto == "off"


def test_veto_off_in_a_yaml_file(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("decode:\n  veto: off\n")
    assert load_config(path).decode.veto == "off"
    with pytest.raises(ConfigError, match="decode.method: True is not one of"):
        load_config(None, ["decode.method=yes"])  # a boolean where no on/off choice exists is still refused
