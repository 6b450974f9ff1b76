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
