"""``tracealign hf convert`` (stream a HF checkpoint to a new dtype / file sharding) and ``tracealign hf info``."""

from __future__ import annotations

import argparse
import json

from tracealign_jax.hf_io.save import DEFAULT_MAX_SHARD_BYTES


def register(subparsers: argparse._SubParsersAction) -> None:
    hf = subparsers.add_parser("hf", help="Hugging Face checkpoints: convert (dtype, file sharding), info")
    sub = hf.add_subparsers(dest="hf_command", metavar="ACTION")

    convert = sub.add_parser("convert", help="rewrite a safetensors HF checkpoint (dtype, file sharding), streamed")
    convert.add_argument("--in", dest="in_dir", required=True, help="HF checkpoint directory (safetensors)")
    convert.add_argument("--out", dest="out_dir", required=True, help="output directory (written atomically)")
    convert.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                         help="stored weight dtype (default: the source's torch_dtype)")
    convert.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                         help="split weights into files of at most this many bytes (default 5 GiB)")
    convert.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here (default: --in)")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    convert.set_defaults(run=run_convert)

    info = sub.add_parser("info", help="print the architecture a HF checkpoint's config.json describes")
    info.add_argument("--in", dest="in_dir", required=True, help="HF checkpoint directory")
    info.set_defaults(run=run_info)


def run_convert(args: argparse.Namespace) -> int:
    from tracealign_jax.hf_io.convert import convert_hf

    out, arch, dtype = convert_hf(args.in_dir, args.out_dir, dtype=args.dtype, tokenizer_dir=args.tokenizer_dir,
                                  max_shard_bytes=args.max_shard_bytes, overwrite=args.overwrite)
    print(f"wrote {out} ({arch.architecture}, {arch.num_params():,} parameters, {dtype})")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from tracealign_jax.model import ModelArch

    arch = ModelArch.from_hf_dir(args.in_dir)
    print(json.dumps({"architecture": arch.architecture, "parameters": arch.num_params(), **arch.__dict__},
                     indent=2, default=str))
    return 0
