"""CLI: ``tracealign demo``, ``tracealign eval adb`` / ``realign-pool``, ``tracealign data generate``."""

from __future__ import annotations

import argparse
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def _load(args: argparse.Namespace):
    from tracealign_jax.config import load_config

    path = args.config or (DEMO_CONFIG if DEMO_CONFIG.is_file() else None)
    return load_config(path, args.set)


def _demo(args: argparse.Namespace) -> int:
    from tracealign_jax.evaluation.demo import run_demo

    run_demo(_load(args), args.out, force=args.force)
    return 0


def _eval_adb(args: argparse.Namespace) -> int:
    from tracealign_jax.evaluation.pipeline import run_adb_eval
    from tracealign_jax.evaluation.report import main_table

    bad = [p for p in args.policy if "=" not in p]
    if bad:
        raise ValueError(f"--policy {bad[0]}: expected NAME=DIR (dpo=DIR, cbd=DIR)")
    policies = dict(p.split("=", 1) for p in args.policy)
    report = run_adb_eval(_load(args), prompts=args.prompts, policies=policies, index_dir=args.index,
                          threshold=args.threshold, veto_table=args.veto_table, forbidden=args.forbidden,
                          qa=args.qa, heldout=args.heldout, out_dir=args.out)
    print(main_table(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _eval_realign_pool(args: argparse.Namespace) -> int:
    from tracealign_jax.atomic_io import atomic_write_json, atomic_write_text
    from tracealign_jax.evaluation.realign_demo import pool_markdown, pool_runs

    pooled = pool_runs(args.runs)
    md = pool_markdown(pooled)
    print(md, end="")
    if args.out:
        atomic_write_json(Path(args.out + ".json"), pooled)
        atomic_write_text(Path(args.out + ".md"), md)
    return 0


def _data_generate(args: argparse.Namespace) -> int:
    from tracealign_jax.evaluation.synthetic_data import write_default_data

    manifest = write_default_data(args.out, args.seed)
    print(f"wrote {len(manifest['files'])} files to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", default=None, help=f"YAML config (default: {DEMO_CONFIG.name} when present)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")

    p = subparsers.add_parser("demo", help="end-to-end drift demo: train, index, align, defend, evaluate, export")
    p.add_argument("--out", default="runs/demo", help="run directory (finished stages are reused)")
    p.add_argument("--force", action="store_true", help="re-run every stage")
    common(p)
    p.set_defaults(run=_demo)

    ev = subparsers.add_parser("eval", help="evaluation harnesses").add_subparsers(dest="eval_command", metavar="WHAT")
    p = ev.add_parser("adb", help="Alignment Drift Benchmark: drift per defense, utility, bound vs measured")
    p.add_argument("--prompts", required=True, help="ADB prompts JSONL (id, category, attack, prompt, expected)")
    p.add_argument("--policy", action="append", required=True, metavar="NAME=DIR",
                   help="dpo=DIR (the aligned policy; required) and optionally cbd=DIR (the CBD-trained one); "
                        "DIR: a Hugging Face checkpoint or a `tracealign train` run dir")
    p.add_argument("--index", required=True, help="TraceIndex directory (its tokenizer is used)")
    p.add_argument("--threshold", required=True, help="calibrated threshold JSON (tracealign bci calibrate)")
    p.add_argument("--veto-table", default="", help="provenance veto table directory (Prov-Decode)")
    p.add_argument("--forbidden", default="", help="forbidden strings JSONL for the exact judge")
    p.add_argument("--qa", default="", help="benign QA JSONL (id, prompt, answer) for accuracy")
    p.add_argument("--heldout", default="", help="held-out benign text JSONL (text) for perplexity")
    p.add_argument("--out", required=True, help="report directory")
    common(p)
    p.set_defaults(run=_eval_adb)

    p = ev.add_parser("realign-pool", help="the realign stage of several demo runs (data seeds) side by side and pooled, "
                                           "TRACE / oracle with a paired bootstrap interval")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="`tracealign demo --out` directories")
    p.add_argument("--out", default="", help="also write OUT.md and OUT.json")
    p.set_defaults(run=_eval_realign_pool)

    data = subparsers.add_parser("data", help="the synthetic default data").add_subparsers(dest="data_command", metavar="WHAT")
    p = data.add_parser("generate", help="write the deterministic fictional default data")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_data_generate)
