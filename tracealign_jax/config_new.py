"""``tracealign config new``: a run config for your checkpoint, from a template, sized to your data.

    tracealign config new --hf-dir CKPT --preferences prefs.jsonl --out run.yaml [--template T.yaml]

Fills ``model.hf_dir`` and ``data.tokenizer_dir`` with the checkpoint (refused unless its config.json
describes a supported decoder; a template ``model.arch`` is dropped: the checkpoint's architecture is
used) and, with ``--preferences``, ``data.train_path`` plus lengths measured on that file: the longest
prompt and the longest response in tokens of the checkpoint's tokenizer become ``max_prompt_len`` /
``max_response_len`` and the one bucket holds both, so no pair is cut. Where the longest pair exceeds
the model's ``max_position_embeddings`` the lengths are capped and the number of cut pairs printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "own_model.yaml"
BUCKET_MULTIPLE = 64  # padded lengths are multiples of this (fewer distinct shapes, aligned tiles)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def sized_lengths(prompt_lens, response_lens, max_positions: int) -> tuple[int, int, int, int]:
    """(max_prompt_len, max_response_len, bucket, pairs cut) for the measured token lengths (int arrays,
    one entry per pair; responses: the longer of chosen / rejected). The bucket is the padded total, a
    multiple of 64 within ``max_positions``; when the longest pair does not fit, the response keeps at
    least half of the positions and the prompt the rest."""
    import numpy as np

    p, r = int(np.max(prompt_lens)), int(np.max(response_lens))
    if p + r > max_positions:
        r = min(r, max(max_positions // 2, max_positions - p))
        p = max_positions - r
    cut = int(np.sum((np.asarray(prompt_lens) > p) | (np.asarray(response_lens) > r)))
    return p, r, min(_round_up(p + r, BUCKET_MULTIPLE), max_positions), cut


def new_config(hf_dir: str | Path, out: str | Path, *, template: str | Path = TEMPLATE, preferences: str = "",
               overwrite: bool = False) -> tuple[Path, str]:
    """Writes the config (validated by ``load_config``) atomically; returns (path, a one-line summary)."""
    import yaml

    from tracealign_jax.atomic_io import atomic_write_text
    from tracealign_jax.config import Config, ConfigError, DataConfig, from_dict, load_config, validate
    from tracealign_jax.model.config import ModelArch

    hf_dir, out = Path(hf_dir).resolve(), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists (pass --overwrite to replace it)")
    arch = ModelArch.from_hf_dir(hf_dir)
    load_config(template)  # a template error is named here, with its file
    values = yaml.safe_load(Path(template).read_text()) or {}
    values.setdefault("model", {}).pop("arch", None)
    values["model"]["hf_dir"] = str(hf_dir)
    data = values.setdefault("data", {})
    data["tokenizer_dir"] = str(hf_dir)
    summary = f"{arch.architecture}, {arch.num_params():,} parameters"
    if preferences:
        from tracealign_jax.pairs import load_pairs

        data["train_path"] = str(Path(preferences).resolve())
        unlimited = DataConfig(train_path=data["train_path"], tokenizer_dir=str(hf_dir),
                               max_prompt_len=arch.max_position_embeddings,
                               max_response_len=arch.max_position_embeddings)  # fmt: skip
        pairs = load_pairs(unlimited)
        responses = [max(c, r) for c, r in zip(pairs.lengths("chosen"), pairs.lengths("rejected"))]
        p, r, bucket, cut = sized_lengths(pairs.lengths("prompt"), responses, arch.max_position_embeddings)
        data.update(max_prompt_len=p, max_response_len=r, buckets=[bucket])
        summary += (f"; {len(pairs)} pairs: prompts <= {p} tokens, responses <= {r}, bucket {bucket}; "
                    + (f"{cut} pairs longer than max_position_embeddings={arch.max_position_embeddings} are cut"
                       if cut else "no pair is cut"))  # fmt: skip
    validate(from_dict(Config, values))  # what is written loads
    text = f"# written by `tracealign config new --hf-dir {hf_dir}` from {template}\n" + yaml.safe_dump(values, sort_keys=False)
    atomic_write_text(out, text)
    return out, summary


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="run configs: new (for your checkpoint, sized to your data)")
    sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    p = sub.add_parser("new", help="write a run config for a Hugging Face checkpoint from a template")
    p.add_argument("--hf-dir", required=True, help="Hugging Face checkpoint dir (config.json, safetensors, tokenizer)")
    p.add_argument("--preferences", default="", help="preference JSONL/Parquet: sets data.train_path and the lengths")
    p.add_argument("--template", default=str(TEMPLATE), help=f"config to start from (default: {TEMPLATE.name})")
    p.add_argument("--out", required=True, help="config YAML to write")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_new)
    config.set_defaults(run=lambda args: (config.print_help(), 2)[1])


def _new(args: argparse.Namespace) -> int:
    out, summary = new_config(args.hf_dir, args.out, template=args.template, preferences=args.preferences,
                              overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {out} ({summary})")
    return 0
