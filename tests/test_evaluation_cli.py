"""The evaluation CLI: `tracealign data generate` writes the shipped bytes; demo / eval adb parse."""

from pathlib import Path

from tracealign_jax.cli import build_parser, main
from tracealign_jax.evaluation.synthetic_data import DEFAULT_DATA_DIR


def test_data_generate_reproduces_the_shipped_data(tmp_path: Path, capsys):
    assert main(["data", "generate", "--out", str(tmp_path)]) == 0
    assert "wrote 7 files" in capsys.readouterr().out  # 7 splits (the manifest is not counted)
    for p in DEFAULT_DATA_DIR.glob("*.jsonl"):
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name


def test_demo_and_eval_adb_arguments():
    args = build_parser().parse_args(["demo", "--out", "r", "--set", "eval.sft_steps=3", "--force"])
    assert (args.out, args.set, args.force) == ("r", ["eval.sft_steps=3"], True)
    args = build_parser().parse_args(["eval", "adb", "--prompts", "p.jsonl", "--policy", "dpo=a", "--policy", "cbd=b",
                                      "--index", "i", "--threshold", "t.json", "--out", "o"])
    assert args.policy == ["dpo=a", "cbd=b"] and args.veto_table == "" and callable(args.run)
