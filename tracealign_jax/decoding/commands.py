"""CLI: ``tracealign decode`` (prompts JSONL -> completions JSONL, optional provenance veto).
Parse, call, print: the logic lives in ``decoding.job``."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("decode", help="beam search / greedy / sampling with an optional provenance veto")
    p.add_argument("--config", default=None, help="YAML config (model, mesh and decode sections are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted config override")
    p.add_argument("--checkpoint", required=True,
                   help="policy: a Hugging Face checkpoint dir or a `tracealign train` run dir (or its checkpoints/)")
    p.add_argument("--prompts", required=True, help="JSONL/Parquet with prompt (text or chat messages) or prompt_ids per record")
    p.add_argument("--out", required=True, help="completions JSONL to write")
    p.add_argument("--veto-table", default="", help="veto table dir (from `tracealign provenance veto-table`)")
    p.add_argument("--veto", choices=("off", "soft", "hard"), default=None, help="overrides decode.veto")
    p.add_argument("--tokenizer", default="", help="tokenizer dir (default: data.tokenizer_dir or the HF checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_decode)


def _decode(args: argparse.Namespace) -> int:
    from tracealign_jax.config import load_config
    from tracealign_jax.decoding.job import run_decode

    overrides = list(args.set) + ([f"decode.veto={args.veto}"] if args.veto else [])
    cfg = load_config(args.config, overrides)
    summary = run_decode(cfg, checkpoint=args.checkpoint, prompts=args.prompts, out=args.out,
                         veto_table=args.veto_table, tokenizer_dir=args.tokenizer,
                         progress=not args.no_progress)  # fmt: skip
    print(json.dumps(summary, sort_keys=True))
    return 0
