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


# ------------------------------------------------------------ the checkpoint's architecture wins (issue 20)
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.hf_tiny import build_torch_model

    out = tmp_path_factory.mktemp("arch") / "llama"
    build_torch_model("llama").save_pretrained(out)
    return out


def test_a_model_arch_that_disagrees_with_the_checkpoint_is_refused_naming_each_field(hf_dir):
    from tracealign_jax.config import ModelConfig
    from tracealign_jax.model import ModelArch, model_arch

    theirs = ModelArch.from_hf_dir(hf_dir)
    with pytest.raises(ConfigError) as err:
        model_arch(ModelConfig(hf_dir=str(hf_dir), arch={"hidden_size": 128, "rms_norm_eps": 1e-5, "vocab_size": 512}))
    msg = str(err.value)
    assert f"hidden_size: model.arch has 128, the checkpoint {theirs.hidden_size}" in msg
    assert f"rms_norm_eps: model.arch has 1e-05, the checkpoint {theirs.rms_norm_eps!r}" in msg
    assert "vocab_size" not in msg and err.value.key == "model.arch"  # 512 agrees
    # Agreeing entries, and fields that do not change the computation, are accepted; the checkpoint's arch is used.
    same = {"hidden_size": theirs.hidden_size, "initializer_range": 0.5, "model_type": "llama"}
    assert model_arch(ModelConfig(hf_dir=str(hf_dir), arch=same)) == theirs
    assert model_arch(ModelConfig(hf_dir=str(hf_dir))) == theirs


def test_commands_refuse_a_yaml_arch_that_disagrees_with_the_checkpoint(hf_dir, tmp_path, capsys):
    """configs/tiny_cpu.yaml's arch differs from the tiny checkpoint in rms_norm_eps and
    max_position_embeddings: train, decode and compile-check each say so, exit 2, before any compile."""
    import json

    from tracealign_jax import cli

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    common = ["--config", "configs/tiny_cpu.yaml", "--set", f"model.hf_dir={hf_dir}"]
    runs = [["train", *common, "--set", f"data.train_path={prefs}", "--set", f"train.output_dir={tmp_path / 'run'}",
             "--no-progress"],
            ["decode", "--config", "configs/tiny_cpu.yaml", "--checkpoint", str(hf_dir), "--prompts",
             str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--no-progress"],
            ["compile-check", *common, "--topology", "v5p:2x2x1", "--step", "train"]]  # fmt: skip
    for argv in runs:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"tracealign {argv[0]}: error: "), err
        assert "model.arch disagrees with" in err and "rms_norm_eps" in err and "max_position_embeddings" in err, err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_config_new_sizes_lengths_to_the_data_and_caps_them_at_the_model_positions():
    from tracealign_jax.config_new import sized_lengths

    assert sized_lengths([10, 30], [50, 90], 512) == (30, 90, 128, 0)  # the longest of each; one bucket, x64
    # 300 + 900 > 512 positions: the response keeps half, the prompt the rest; the one long pair is cut.
    assert sized_lengths([10, 300], [50, 900], 512) == (256, 256, 512, 1)
    assert sized_lengths([100, 100], [50, 900], 512) == (100, 412, 512, 1)  # a short prompt leaves the rest
