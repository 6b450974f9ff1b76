"""Corpus side of the build: read JSONL/Parquet records, tokenize with a local HF fast tokenizer, index.

A record is ``{"text": str, "unsafe": bool | "risk": float in [0, 1], "category": str, ...}``; every
field but the text is kept as document metadata, plus ``source`` = ``file:line``. Malformed records
raise ``RecordError`` naming file, line and field. Tokens are raw text ids (no BOS/EOS added).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from tracealign_jax.atomic_io import atomic_directory
from tracealign_jax.index import format as fmt
from tracealign_jax.index.build import policy_risk, write_index
from tracealign_jax.records import RecordError, iter_records, require

# Files that define a Hugging Face tokenizer (copied into the index so it is self-contained).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja")


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> tuple[str, str]:
    """(name, hash) of a tokenizer directory; the hash is SHA-256 (16 hex) of ``tokenizer.json``,
    which fixes vocabulary, merges, normalization and added tokens of a fast tokenizer."""
    tokenizer_dir = Path(tokenizer_dir)
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (a fast Hugging Face tokenizer directory is needed)")
    name = tokenizer_dir.resolve().name
    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("name_or_path") or name
    return str(name), hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_tokenizer(tokenizer_dir: str | Path):
    """A fast tokenizer from a local directory (never the network)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if not tok.is_fast:
        raise ValueError(f"{tokenizer_dir}: tokenizer is not a fast (Rust) tokenizer")
    return tok


def iter_corpus(paths: Sequence[str | Path], text_field: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields ``(text, metadata)``; metadata has every other field, its policy label checked."""
    for path in paths:
        for line, rec in iter_records(path):
            text = require(rec, text_field, str, path, line)
            try:
                policy_risk(rec)
            except (KeyError, TypeError, ValueError) as err:
                field, _, problem = str(err).strip("'\"").partition(": ")
                raise RecordError(path, line, field, problem) from None
            meta = {k: v for k, v in rec.items() if k != text_field}
            meta["source"] = f"{Path(path).name}:{line}"
            yield text, meta


def _batches(it: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def with_separators(ids: list[list[int]], sep: int, dtype: np.dtype) -> np.ndarray:
    """Token ids of a batch of documents, each followed by ``sep``, as one array."""
    lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
    flat = np.fromiter((t for x in ids for t in x), np.int64, count=int(lengths.sum()))
    out = np.full(int(lengths.sum()) + len(ids), sep, dtype)
    # token k of the batch lands after one separator per earlier document
    out[np.arange(len(flat)) + np.repeat(np.arange(len(ids)), lengths)] = flat
    return out


def build_index(
    corpus_paths: Sequence[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    shard_tokens: int | None = None,
    overwrite: bool = False,
    batch_size: int = 1000,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Tokenizes the corpus (batched, the fast tokenizer's Rust threads) and builds the index in
    ``out_dir`` atomically. The tokenizer files are copied to ``out_dir/tokenizer``. Returns out_dir."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:  # before the (long) tokenization, not after
        raise FileExistsError(f"{out_dir} exists (pass overwrite=True / --overwrite to replace it)")
    tok = load_tokenizer(tokenizer_dir)
    name, tok_hash = tokenizer_fingerprint(tokenizer_dir)
    vocab_size = len(tok)
    dtype = fmt.token_dtype(vocab_size)
    pieces: list[np.ndarray] = []
    metadata: list[dict[str, Any]] = []
    with tqdm(unit="doc", desc="tokenizing", disable=not progress) as bar:
        for batch in _batches(iter_corpus(corpus_paths, text_field), batch_size):
            ids = tok([text for text, _ in batch], add_special_tokens=False, return_attention_mask=False)["input_ids"]
            pieces.append(with_separators(ids, vocab_size, dtype))
            metadata.extend(meta for _, meta in batch)
            bar.update(len(batch))
    tokens_P = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
    doc_ends = np.flatnonzero(tokens_P == vocab_size) + 1
    doc_starts_D1 = np.concatenate([[0], doc_ends]).astype(np.int64)
    tokenize_s = time.perf_counter() - t0
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / fmt.TOKENIZER_DIR).mkdir()
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / fname).is_file():
                shutil.copy2(Path(tokenizer_dir) / fname, tmp / fmt.TOKENIZER_DIR / fname)
        write_index(tmp, tokens_P, doc_starts_D1, vocab_size=vocab_size, metadata=metadata,
                    tokenizer_name=name, tokenizer_hash=tok_hash, shard_tokens=shard_tokens, threads=threads,
                    progress=progress,
                    extra_manifest={"corpus": [str(p) for p in corpus_paths], "text_field": text_field,
                                    "tokenize_seconds": round(tokenize_s, 4)})
    return out_dir
