"""``tracealign train`` (DPO / DPO+CBD / SFT from a config) and ``tracealign export-hf`` (checkpoint -> HF)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train (SFT, DPO-family, + CBD) from a YAML config; resumes automatically")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="dotted override, e.g. --set loss.cbd_data_weight=0.1 (repeatable)")
    train.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to metrics.jsonl)")
    train.set_defaults(run=_train)

    export = subparsers.add_parser("export-hf", help="write a training checkpoint's policy as a Hugging Face checkpoint")
    export.add_argument("--checkpoint", required=True, help="run dir (with config.yaml + checkpoints/), its checkpoints/ dir, or a HF checkpoint dir")
    export.add_argument("--out", required=True, help="output directory (safetensors + config.json)")
    export.add_argument("--config", default=None, help="the run's config (default: <run dir>/config.yaml)")
    export.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    export.add_argument("--tokenizer", default=None, help="tokenizer dir to copy (default: data.tokenizer_dir)")
    export.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="weights dtype on disk")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=_export)


def _train(args: argparse.Namespace) -> int:
    from tracealign_jax.config import load_config
    from tracealign_jax.training.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, show_progress=not args.no_progress)
    last = result.history[-1] if result.history else {}
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    print(f"trained {result.steps_run} steps{resumed} -> {cfg.train.output_dir}; "
          f"loss {last.get('loss/total', float('nan')):.4f}, accuracy {last.get('rewards/accuracies', float('nan')):.3f}; "
          f"{result.num_skipped_records} malformed records skipped")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tracealign_jax.decoding.job import model_dir_kind
    from tracealign_jax.training.export import export_checkpoint

    if model_dir_kind(args.checkpoint) == "hf":  # already a HF checkpoint: rewrite it (dtype, tokenizer)
        from tracealign_jax.hf_io.convert import convert_hf

        out = convert_hf(args.checkpoint, args.out, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                         overwrite=args.overwrite)[0]
        print(f"wrote {out}")
        return 0
    out = export_checkpoint(Path(args.checkpoint), Path(args.out), config_path=args.config, step=args.step,
                            tokenizer_dir=args.tokenizer, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
