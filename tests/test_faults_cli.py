"""CLI faults (issue 17 items 2, 15, kills): commands that meet an index with data of another tokenizer
refuse it with exit 2; token ids outside the index vocabulary are named by line; host-only commands do not
import JAX / transformers (start-up time); a SIGKILL during `index build` leaves no loadable half-index."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracealign_jax import cli
from tracealign_jax.index import TraceIndex
from tracealign_jax.platform_env import tpu_chips_present

ROOT = Path(__file__).resolve().parents[1]
WORDS = "how do i bake bread mix flour and water no thanks sure here is a recipe the cat sat on mat".split()


def _tokenizer(directory: Path, texts: list[str], vocab_size: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli17")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(150)]
    _tokenizer(root / "tok", texts, 70)
    _tokenizer(root / "other", texts[::-1], 50)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t, "unsafe": "recipe" in t, "category": "c"}) + "\n"
                                               for t in texts))  # fmt: skip
    assert cli.main(["index", "build", "--corpus", str(root / "corpus.jsonl"), "--tokenizer", str(root / "tok"),
                     "--out", str(root / "idx"), "--quiet"]) == 0  # fmt: skip
    (root / "prefs.jsonl").write_text("".join(json.dumps({"prompt": "how do i bake bread", "chosen": "sure here is a recipe",
                                                          "rejected": "no thanks"}) + "\n" for _ in range(4)))  # fmt: skip
    return root


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_token_bci_refuses_data_of_another_tokenizer(setup, tmp_path, capsys):
    root = setup
    common = ["provenance", "token-bci", "--index", str(root / "idx"), "--tau", "1.0",
              "--set", f"data.train_path={root / 'prefs.jsonl'}", "--set", "data.max_prompt_len=16",
              "--set", "data.max_response_len=16", "--set", "data.buckets=[32]"]  # fmt: skip
    argv = common + ["--set", f"data.tokenizer_dir={root / 'other'}", "--out", str(tmp_path / "bci")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "index was built with tokenizer" in err and "manifest.json" in err
    assert not (tmp_path / "bci").exists()
    ok = common + ["--set", f"data.tokenizer_dir={root / 'tok'}", "--out", str(tmp_path / "bci")]
    assert cli.main(ok) == 0
    meta = json.loads((tmp_path / "bci" / "meta.json").read_text())
    assert meta["tokenizer_hash"] == TraceIndex.open(root / "idx").tokenizer_hash and meta["dataset_identity"]["data"]


def test_token_ids_outside_the_index_vocabulary_are_named(setup, tmp_path, capsys):
    root = setup
    (tmp_path / "c.jsonl").write_text(json.dumps({"tokens": [1, 2, 3]}) + "\n" + json.dumps({"tokens": [4, 900]}) + "\n")
    assert cli.main(["bci", "score", "--index", str(root / "idx"), "--input", str(tmp_path / "c.jsonl")]) == 2
    assert f"{tmp_path / 'c.jsonl'}:2: tokens: token id 900 outside the index vocabulary" in capsys.readouterr().err


def test_commands_table_matches_the_modules():
    parser = cli.build_parser()
    assert sorted(parser._subparsers._group_actions[0].choices) == sorted(cli.COMMANDS)


def test_host_only_commands_do_not_import_jax_or_transformers(setup):
    code = ("import sys; from tracealign_jax import cli; rc = cli.main(['index', 'query', sys.argv[1], 'count', "
            "'--text', 'bake bread']); heavy = sorted(m for m in ('jax', 'flax', 'transformers', 'torch', 'tensorstore') "
            "if m in sys.modules); print(rc, heavy)")
    out = subprocess.run([sys.executable, "-c", code, str(setup / "idx")], env=_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_during_index_build_leaves_no_loadable_half_index(setup, tmp_path, seed):
    out = tmp_path / "idx"
    proc = subprocess.Popen([sys.executable, "-m", "tracealign_jax.cli", "index", "build", "--corpus",
                             str(setup / "corpus.jsonl"), "--tokenizer", str(setup / "tok"), "--out", str(out), "--quiet"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(random.Random(seed).uniform(0.5, 6.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():  # it finished before the kill: then it is complete
        TraceIndex.open(out, verify="full")
    leftovers = [p for p in tmp_path.iterdir() if p.name != "idx"]
    assert all(p.name.startswith(".idx.tmp-") for p in leftovers)  # a temp dir, never at the output path
    for p in leftovers:
        with pytest.raises(Exception):
            TraceIndex.open(p)


# ---------------------------------------------------------------- every command: one line, exit 2 (issue 20)
BAD_JSONL = '{"text": "bake bread", "prompt": "bake bread"}\n{"text": "mix\n'  # line 2: not valid JSON


@pytest.fixture(scope="module")
def inputs(setup, tmp_path_factory):
    """What the fault table feeds: a threshold, a HF model, a run dir, a malformed JSONL, a broken
    config.json / YAML / threshold, an empty directory."""
    from tests.hf_tiny import build_torch_model

    root = tmp_path_factory.mktemp("faults20")
    assert cli.main(["bci", "calibrate", "--index", str(setup / "idx"), "--compliant", str(setup / "corpus.jsonl"),
                     "--out", str(root / "tau.json")]) == 0  # fmt: skip
    build_torch_model("llama").save_pretrained(root / "model")
    (root / "bad.jsonl").write_text(BAD_JSONL)
    (root / "empty").mkdir()
    (root / "broken_hf").mkdir()
    (root / "broken_hf" / "config.json").write_text('{"model_type": "llama", ')
    (root / "bad.yaml").write_text("train: [steps: 2\n")
    (root / "bad_tau.json").write_text("{not json")
    (root / "run" / "checkpoints" / "1").mkdir(parents=True)
    (root / "run" / "config.yaml").write_text("train: {steps: [\n")
    (root / "rules.yaml").write_text("categories: [{name: baking, rule: forbid, patterns: [recipe]}]\n")
    (root / "forbidden.jsonl").write_text(json.dumps({"source_id": "s", "strings": ["mix flour and water"]}) + "\n")
    return root


def _fault_table(s: Path, r: Path, out_path: Path) -> dict[str, list[list[str]]]:
    """{command: [argv with a missing file, with a wrong kind of directory, with a malformed record / file]}."""
    idx, tok, miss = str(s / "idx"), str(s / "tok"), str(r / "missing.jsonl")
    bad, empty, tau = str(r / "bad.jsonl"), str(r / "empty"), str(r / "tau.json")
    out = ["--out", str(out_path)]
    data = ["--set", "data.max_prompt_len=8", "--set", "data.max_response_len=8", "--set", "data.buckets=[16]",
            "--set", f"data.tokenizer_dir={tok}"]  # fmt: skip
    train = ["train", "--config", "configs/tiny_cpu.yaml", "--no-progress", "--set", "train.steps=1", *data,
             "--set", f"train.output_dir={r / 'train_out'}"]  # fmt: skip
    adb = ["eval", "adb", "--index", idx, "--threshold", tau, "--set", "provenance.bci=evidence",
           "--forbidden", str(r / "forbidden.jsonl"), *out]
    return {
        "index build": [["index", "build", "--corpus", miss, "--tokenizer", tok, *out],
                        ["index", "build", "--corpus", str(s / "corpus.jsonl"), "--tokenizer", empty, *out],
                        ["index", "build", "--corpus", bad, "--tokenizer", tok, *out]],
        "index query": [["index", "query", miss, "count", "--tokens", "1"],
                        ["index", "query", tok, "count", "--tokens", "1"],
                        ["index", "query", idx, "count", "--tokens", "1,x"]],
        "index verify": [["index", "verify", miss], ["index", "verify", tok], ["index", "verify", empty]],
        "bci score": [["bci", "score", "--index", idx, "--input", miss],
                      ["bci", "score", "--index", empty, "--input", str(s / "corpus.jsonl")],
                      ["bci", "score", "--index", idx, "--input", bad]],
        "bci calibrate": [["bci", "calibrate", "--index", idx, "--compliant", miss, *out],
                          ["bci", "calibrate", "--index", tok, "--compliant", str(s / "corpus.jsonl"), *out],
                          ["bci", "calibrate", "--index", idx, "--compliant", bad, *out]],
        "bci evaluate": [["bci", "evaluate", "--index", idx, "--labelled", miss, "--compliant", miss],
                         ["bci", "evaluate", "--index", empty, "--labelled", bad, "--compliant", bad],
                         ["bci", "evaluate", "--index", idx, "--labelled", bad, "--compliant", str(s / "corpus.jsonl")]],
        "shield": [["shield", "--index", idx, "--threshold", tau, "--input", miss, *out],
                   ["shield", "--index", idx, "--threshold", empty, "--input", str(s / "corpus.jsonl"), *out],
                   ["shield", "--index", idx, "--threshold", str(r / "bad_tau.json"), "--input", bad, *out]],
        "bound": [["bound", "--index", idx, "--threshold", tau, "--queries", miss, *out],
                  ["bound", "--index", empty, "--threshold", tau, "--queries", str(s / "prefs.jsonl"), *out],
                  ["bound", "--index", idx, "--threshold", tau, "--queries", bad, *out]],
        "provenance token-bci": [["provenance", "token-bci", "--index", idx, "--threshold", tau, *data,
                                  "--set", f"data.train_path={miss}", *out],
                                 ["provenance", "token-bci", "--index", tok, "--threshold", tau, *data,
                                  "--set", f"data.train_path={s / 'prefs.jsonl'}", *out],
                                 ["provenance", "token-bci", "--index", idx, "--threshold", tau, *data,
                                  "--set", f"data.train_path={bad}", *out]],
        "provenance veto-table": [["provenance", "veto-table", "--index", idx, "--threshold", miss, *out],
                                  ["provenance", "veto-table", "--index", empty, "--threshold", tau, *out],
                                  ["provenance", "veto-table", "--index", idx, "--threshold", str(r / "bad_tau.json"), *out]],
        "hf convert": [["hf", "convert", "--in", miss, *out], ["hf", "convert", "--in", idx, *out],
                       ["hf", "convert", "--in", str(r / "broken_hf"), *out]],
        "hf info": [["hf", "info", "--in", miss], ["hf", "info", "--in", idx], ["hf", "info", "--in", str(r / "broken_hf")]],
        "compile-check": [["compile-check", "--config", miss], ["compile-check", "--config", empty],
                          ["compile-check", "--config", str(r / "bad.yaml")]],
        "train": [[*train, "--set", f"data.train_path={miss}"],
                  [*train, "--set", f"model.hf_dir={idx}", "--set", f"data.train_path={s / 'prefs.jsonl'}"],
                  [*train, "--set", f"data.train_path={bad}"]],
        "export-hf": [["export-hf", "--checkpoint", miss, *out], ["export-hf", "--checkpoint", idx, *out],
                      ["export-hf", "--checkpoint", str(r / "run"), *out]],
        "decode": [["decode", "--checkpoint", miss, "--prompts", str(s / "prefs.jsonl"), *out],
                   ["decode", "--checkpoint", idx, "--prompts", str(s / "prefs.jsonl"), *out],
                   ["decode", "--checkpoint", str(r / "model"), "--tokenizer", tok, "--prompts", bad, *out]],
        "demo": [["demo", "--config", miss, *out], ["demo", "--config", empty, *out],
                 ["demo", "--config", str(r / "bad.yaml"), *out]],
        "eval adb": [[*adb, "--prompts", miss, "--policy", f"dpo={r / 'model'}"],
                     [*adb, "--prompts", str(s / "prefs.jsonl"), "--policy", f"dpo={idx}"],
                     [*adb, "--prompts", bad, "--policy", f"dpo={r / 'model'}"]],
        "config new": [["config", "new", "--hf-dir", str(r / "model"), "--preferences", miss, *out],
                       ["config", "new", "--hf-dir", idx, *out],
                       ["config", "new", "--hf-dir", str(r / "model"), "--template", str(r / "bad.yaml"), *out]],
        "realign triage": [["realign", "triage", "--pairs", miss, "--rules", str(r / "rules.yaml"), *out],
                           ["realign", "triage", "--pairs", str(s / "prefs.jsonl"), "--rules", empty, *out],
                           ["realign", "triage", "--pairs", bad, "--rules", str(r / "rules.yaml"), *out]],
        "realign impact": [["realign", "impact", "--config", miss, "--pairs", str(s / "prefs.jsonl"), *out],
                           ["realign", "impact", "--config", empty, "--pairs", str(s / "prefs.jsonl"), *out],
                           ["realign", "impact", "--config", "configs/tiny_cpu.yaml", *data, "--pairs", bad, *out]],
    }


def test_fault_table_covers_every_command_that_reads_files():
    table = _fault_table(Path("s"), Path("r"), Path("o"))
    assert {name.split()[0] for name in table} == set(cli.COMMANDS) - {"data"}  # `data generate` reads nothing


@pytest.mark.parametrize("case", range(3), ids=["missing_file", "wrong_directory", "malformed"])
@pytest.mark.parametrize("command", sorted(_fault_table(Path("s"), Path("r"), Path("o"))))
def test_each_command_refuses_bad_input_in_one_line(setup, inputs, command, case, tmp_path, capsys):
    argv = _fault_table(setup, inputs, tmp_path / "out")[command][case]
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, err)
    lines = [ln for ln in err.splitlines() if ln.strip() and "/s]" not in ln]  # progress bars are not errors
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"tracealign {command}: error: "), err


def test_no_libtpu_noise_without_tpu_chips(inputs, tmp_path):
    """libtpu (the tpu-aot extra) probes for a TPU VM whenever JAX starts; the CLI answers its probes on a
    machine without chips, so a command that starts JAX prints its one-line error and nothing else."""
    pytest.importorskip("libtpu")
    if tpu_chips_present():
        pytest.skip("a TPU VM: libtpu finds its chips")
    env = {k: v for k, v in _env().items() if not k.startswith(("JAX_PLATFORMS", "TPU_", "XLA_FLAGS"))}
    argv = [sys.executable, "-m", "tracealign_jax.cli", "decode", "--checkpoint", str(inputs / "model"),
            "--prompts", str(inputs / "bad.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--no-progress"]  # fmt: skip
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "/s]" not in ln]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("tracealign decode: error: "), out.stderr
    # The same environment without the CLI: JAX alone shows the noise the CLI keeps away.
    bare = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert "INVALID_ARGUMENT" in bare.stderr, bare.stderr


def test_export_hf_of_a_hf_checkpoint_rewrites_it(inputs, tmp_path, capsys):
    """export-hf takes the same model forms as decode: a HF dir is rewritten (here to bfloat16), like `hf convert`."""
    from safetensors.numpy import load_file

    assert cli.main(["export-hf", "--checkpoint", str(inputs / "model"), "--out", str(tmp_path / "bf16"),
                     "--dtype", "bfloat16"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["model_type"] == "llama"
    src = load_file(str(next((inputs / "model").glob("*.safetensors"))))
    out = {}
    for f in (tmp_path / "bf16").glob("*.safetensors"):
        out.update(load_file(str(f)))
    assert sorted(out) == sorted(src)
    name = "model.layers.0.mlp.down_proj.weight"
    assert out[name].dtype.itemsize == 2 and src[name].dtype.itemsize == 4
    import ml_dtypes
    import numpy as np

    np.testing.assert_array_equal(out[name].astype(np.float32), src[name].astype(ml_dtypes.bfloat16).astype(np.float32))
