"""``tracealign index build`` and ``tracealign index query``: parse, call, print (one JSON line per result).

    tracealign index build --corpus data/*.jsonl --tokenizer tok_dir --out idx [--shard-tokens N]
    tracealign index query idx count --text " some words"     # bundled tokenizer; BPE words carry their leading space
    tracealign index query idx locate --tokens 5,17,3 --limit 10
    tracealign index query idx maximal --text "..." --min-len 2 --max-count 3
    tracealign index query idx next --tokens 5,17
    tracealign index verify idx                                # full SHA-256 check of every file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="build and query a TraceIndex (suffix-array index of a corpus)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="index_command", metavar="INDEX_COMMAND")

    b = sub.add_parser("build", help="tokenize a JSONL/Parquet corpus and build an index")
    b.add_argument("--corpus", nargs="+", required=True, help="JSONL or Parquet files (text + unsafe/risk + category)")
    b.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer directory")
    b.add_argument("--out", required=True, help="index directory to create")
    b.add_argument("--text-field", default="text")
    b.add_argument("--shard-tokens", type=int, default=None, help="positions per shard (default: one per core)")
    b.add_argument("--batch-size", type=int, default=1000, help="documents per tokenizer call")
    b.add_argument("--threads", type=int, default=None, help="sorting threads (default: all cores)")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(run=run_build)

    q = sub.add_parser("query", help="count / locate / longest / maximal / next over an index")
    q.add_argument("index", help="index directory")
    q.add_argument("op", choices=("count", "locate", "longest", "maximal", "next"))
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text, tokenized with the index's bundled tokenizer")
    src.add_argument("--tokens", help="comma-separated token ids")
    q.add_argument("--limit", type=int, default=10, help="locate: occurrences to list")
    q.add_argument("--min-len", type=int, default=1, help="maximal: shortest span to report")
    q.add_argument("--max-count", type=int, default=None, help="maximal: drop spans with more occurrences")
    q.add_argument("--verify", choices=("auto", "size", "full"), default="auto",
                   help="auto (default): SHA-256 of files changed since last verified; full: every file's SHA-256; "
                        "size: sizes only")
    q.set_defaults(run=run_query)

    v = sub.add_parser("verify", help="check every file of an index against its manifest's SHA-256 (exit 2 if not)")
    v.add_argument("index", help="index directory")
    v.set_defaults(run=run_verify)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def run_build(args: argparse.Namespace) -> int:
    from tracealign_jax.index.corpus import build_index
    from tracealign_jax.index.query import TraceIndex

    tok = Path(args.tokenizer)
    if not any((tok / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"--tokenizer {tok}: not a tokenizer directory (no tokenizer.json / tokenizer_config.json): "
                         "give the model's Hugging Face directory")
    out = build_index(args.corpus, args.tokenizer, args.out, text_field=args.text_field,
                      shard_tokens=args.shard_tokens, overwrite=args.overwrite, batch_size=args.batch_size,
                      threads=args.threads, progress=not args.quiet)
    m = TraceIndex.open(out).manifest
    seconds = m["tokenize_seconds"] + m["build"]["write_seconds"]
    size = sum(f["bytes"] for f in m["files"].values())
    print(f"index {out}: {m['num_tokens']:,} tokens, {m['num_docs']:,} docs, {len(m['shard_starts']) - 1} shards, "
          f"{m['token_dtype']} tokens, {m['sa_bits']}-bit SA, {size / max(m['num_tokens'], 1):.2f} bytes/token, "
          f"{seconds:.2f} s ({m['num_tokens'] / max(seconds, 1e-9) / 1e6:.2f} M tok/s; sort "
          f"{m['build']['sort_seconds']:.2f} s), peak RSS {m['build']['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"tokenizer {m['tokenizer_name']} ({m['tokenizer_hash']})")
    return 0


def _query_tokens(args: argparse.Namespace, index, text: str | None = None) -> list[int]:
    """The query's token ids: ``--tokens``, or ``text`` (default ``--text``) tokenized like the corpus."""
    if args.tokens is not None:
        try:
            return [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--tokens: expected comma-separated integers, got {args.tokens!r}") from None
    text = args.text if text is None else text
    if index.tokenizer_dir is None:
        raise ValueError(f"{index.path}: no bundled tokenizer; pass --tokens")
    if (index.tokenizer_dir / "tokenizer.json").is_file():
        # The Rust tokenizer that the fast HF tokenizer wraps, without importing transformers (and torch):
        # seconds of a query command's start-up for the same ids.
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(index.tokenizer_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    from tracealign_jax.index.corpus import load_tokenizer

    return load_tokenizer(index.tokenizer_dir)(text, add_special_tokens=False)["input_ids"]


def _leading_space_hint(args: argparse.Namespace, index) -> None:
    """A BPE tokenizer spells a word inside a sentence with its leading space (" word" is one token,
    "word" another): a text query that counts 0 is retried with the space, and the user told."""
    if args.text is None or args.text.startswith(" "):
        return
    spaced = index.count(_query_tokens(args, index, " " + args.text))
    if spaced:
        print(f"note: {args.text!r} occurs 0 times, {' ' + args.text!r} (with its leading space, as BPE tokenizers "
              f"spell a word inside a sentence) {spaced} times: query --text {' ' + args.text!r}", file=sys.stderr)


def run_query(args: argparse.Namespace) -> int:
    from tracealign_jax.index.query import TraceIndex

    index = TraceIndex.open(Path(args.index), verify=args.verify)
    tokens = _query_tokens(args, index)
    if args.op == "count":
        out = {"tokens": tokens, "count": index.count(tokens)}
        if out["count"] == 0:
            _leading_space_hint(args, index)
    elif args.op == "locate":
        hits = index.locate(tokens, args.limit)
        metas = index.doc_metadata([d for d, _ in hits])
        out = {"tokens": tokens, "count": index.count(tokens),
               "occurrences": [{"doc_id": d, "offset": o, "metadata": m} for (d, o), m in zip(hits, metas)]}
    elif args.op == "longest":
        out = {"tokens": tokens, "longest": index.longest_matches(tokens).tolist()}
    elif args.op == "maximal":
        spans = index.maximal_spans(tokens, min_len=args.min_len, max_count=args.max_count)
        out = {"tokens": tokens, "spans": [s._asdict() | {"span_tokens": tokens[s.start:s.end]} for s in spans]}
    else:
        ids, counts = index.next_token_counts(tokens)
        out = {"tokens": tokens, "next": dict(zip(map(str, ids.tolist()), counts.tolist()))}
    print(json.dumps(out))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    import time

    from tracealign_jax.atomic_io import remember_verified, verify_manifest

    start = time.perf_counter()
    manifest = verify_manifest(Path(args.index), checksums=True)
    remember_verified(Path(args.index), manifest)
    size = sum(f["bytes"] for f in manifest.get("files", {}).values())
    print(f"{args.index}: {len(manifest.get('files', {}))} files, {size / 2**20:.1f} MiB match the manifest "
          f"({time.perf_counter() - start:.2f} s)")
    return 0
