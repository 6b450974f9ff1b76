"""Tokenized preference pairs: read, validate, tokenize once (cached by content hash).

Shared by training (batches) and provenance (per-token BCI of the same response tokens), so neither
imports the other. Records (JSONL or Parquet, one pair per record), in any of three forms:
  strings        {"prompt": str, "chosen": str, "rejected": str}
  conversations  {"prompt": [{"role", "content"}, ...], "chosen": str | [messages], "rejected": ...}
                 rendered with the tokenizer's chat template (the response is what the template adds
                 after the generation prompt)
  token ids      {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]} (no tokenizer)
For SFT only ``prompt`` + ``chosen`` (or ``response``) are needed. A malformed record raises
``RecordError`` naming file, line and field before any training, unless ``data.skip_malformed``
(then it is skipped and counted in ``TokenizedPairs.num_skipped``).

Truncation: responses keep their start (at most ``max_response_len`` tokens); an over-long prompt
keeps its end (``truncation: keep_end``, the tokens next to the response) or its start (``keep_start``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tracealign_jax.atomic_io import atomic_directory, sha256_file, verify_manifest, write_manifest
from tracealign_jax.config import ConfigError, DataConfig
from tracealign_jax.records import RecordError, iter_records, require

FIELDS = ("prompt", "chosen", "rejected")
CACHE_FORMAT = "tracealign-pref-tokens-v1"


@dataclass
class TokenizedPairs:
    """Tokenized dataset as flat arrays: ``<f>_tokens`` int32 concatenated, ``<f>_offsets`` int64[N+1]."""

    arrays: dict[str, np.ndarray]
    num_skipped: int = 0
    fingerprint: str = ""
    identity: dict = dataclasses.field(default_factory=dict)  # what the fingerprint hashes (data file, tokenizer, lengths)
    tokenizer_vocab: int = 0  # len(tokenizer) of data.tokenizer_dir (0: token-id records, no tokenizer)

    def __len__(self) -> int:
        return len(self.arrays["prompt_offsets"]) - 1

    def get(self, field: str, i: int) -> np.ndarray:
        off = self.arrays[f"{field}_offsets"]
        return self.arrays[f"{field}_tokens"][off[i] : off[i + 1]]

    def lengths(self, field: str) -> np.ndarray:
        return np.diff(self.arrays[f"{field}_offsets"])


def _messages(value: Any, path: Path, line: int, field: str) -> list[dict]:
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RecordError(path, line, f"{field}[{j}]", "expected {'role': str, 'content': str}")
    return list(value)


def _nonempty(value: Any, path: Path, line: int, field: str) -> Any:
    """A response that is empty or only whitespace would train on EOS alone: refused like any malformed field."""
    if isinstance(value, str) and not value.strip() or isinstance(value, list) and not value:
        raise RecordError(path, line, field, "empty response")
    return value


def _encode_record(rec: dict, path: Path, line: int, tokenizer: Any, fields: Sequence[str]) -> dict[str, list[int]]:
    """Token ids of prompt and responses of one record (before truncation)."""
    if "prompt_ids" in rec:
        out = {}
        for f in fields:
            ids = require(rec, f"{f}_ids", list, path, line)
            if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise RecordError(path, line, f"{f}_ids", "expected a list of non-negative ints")
            out[f] = ids
        return out
    if tokenizer is None:
        raise RecordError(path, line, "prompt", "text records need data.tokenizer_dir (or give prompt_ids/chosen_ids/rejected_ids)")
    prompt = require(rec, "prompt", (str, list), path, line)
    out = {}
    if isinstance(prompt, list):
        msgs = _messages(prompt, path, line, "prompt")
        if getattr(tokenizer, "chat_template", None) is None:
            raise RecordError(path, line, "prompt", "a conversation needs a tokenizer with a chat template "
                                                    "(data.tokenizer_dir has none); give prompt as a string")
        prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out["prompt"] = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        for f in fields[1:]:
            resp = _nonempty(require(rec, f, (str, list), path, line), path, line, f)
            turn = [{"role": "assistant", "content": resp}] if isinstance(resp, str) else _messages(resp, path, line, f)
            full = tokenizer.apply_chat_template(msgs + turn, tokenize=False)
            if not full.startswith(prompt_text):
                raise RecordError(path, line, f, "chat template does not extend the prompt rendering")
            out[f] = tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        return out
    out["prompt"] = tokenizer(prompt)["input_ids"]  # special tokens (BOS) belong to the prompt
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for f in fields[1:]:
        text = _nonempty(require(rec, f, str, path, line), path, line, f)
        out[f] = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    return out


def _truncate(ids: list[int], n: int, keep_end: bool) -> list[int]:
    return ids[-n:] if keep_end and len(ids) > n else ids[:n]


def _fingerprint(cfg: DataConfig, fields: Sequence[str]) -> tuple[str, dict]:
    tok_hash = ""
    if cfg.tokenizer_dir:
        h = hashlib.sha256()
        for p in sorted(Path(cfg.tokenizer_dir).glob("*")):
            if p.is_file() and p.suffix in (".json", ".model", ".txt", ".jinja"):
                h.update(p.name.encode() + sha256_file(p).encode())
        tok_hash = h.hexdigest()
    key = dict(format=CACHE_FORMAT, data=sha256_file(cfg.train_path), tok=tok_hash, fields=list(fields),
               prompt=cfg.max_prompt_len, response=cfg.max_response_len, trunc=cfg.truncation, skip=cfg.skip_malformed)  # fmt: skip
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16], key


_IDENTITY_NAMES = {"data": "preference file contents (SHA-256)", "tok": "tokenizer files", "fields": "fields",
                   "prompt": "data.max_prompt_len", "response": "data.max_response_len", "trunc": "data.truncation",
                   "skip": "data.skip_malformed", "format": "tokenization format"}  # fmt: skip


def check_same_dataset(meta: dict, pairs: "TokenizedPairs", where: str) -> None:
    """Refuses an artifact (per-token BCI store, reference log-prob store) whose ``meta`` records another
    tokenized dataset than ``pairs``: its rows would land on the wrong examples. Names what differs.
    Artifacts that record no dataset (written by hand or by older code) are checked by size only."""
    theirs, ours = meta.get("dataset_identity"), pairs.identity
    if isinstance(theirs, dict) and ours:
        diff = [k for k in sorted(set(theirs) | set(ours)) if k != "source" and theirs.get(k) != ours.get(k)]
        if diff:
            named = ", ".join(f"{_IDENTITY_NAMES.get(k, k)} ({theirs.get(k)!r} vs now {ours.get(k)!r})"
                              if k != "data" and k != "tok" else _IDENTITY_NAMES[k] for k in diff)
            src = theirs.get("source", "another preference file")
            raise ConfigError(f"{where}: built on another dataset ({src}); differs in {named}; rebuild it "
                              f"for {ours.get('source', 'this data')} (e.g. `tracealign provenance token-bci`)")
    elif meta.get("dataset") and pairs.fingerprint and meta["dataset"] != pairs.fingerprint:
        raise ConfigError(f"{where}: built on another dataset (fingerprint {meta['dataset']}, this data has "
                          f"{pairs.fingerprint}); rebuild it for this data")


def check_token_ids(pairs: "TokenizedPairs", vocab_size: int, path: str | Path, what: str) -> None:
    """Refuses token ids >= ``vocab_size`` (the model's embedding rows), naming the first record that has one:
    an out-of-range id reads garbage / NaN from the embedding, which trains on nothing and says nothing."""
    for f in ("prompt", "chosen", "rejected"):
        toks = pairs.arrays.get(f"{f}_tokens")
        if toks is None or not len(toks):
            continue
        bad = np.flatnonzero(toks >= vocab_size)
        if len(bad):
            ex = int(np.searchsorted(pairs.arrays[f"{f}_offsets"], bad[0], side="right") - 1)
            line = int(pairs.arrays["line"][ex]) if "line" in pairs.arrays else ex + 1
            raise RecordError(path, line, f, f"token id {int(toks[bad[0]])} >= {what} vocab_size {vocab_size} "
                                             f"(max id in the data: {int(toks.max())}); the tokenizer and the model disagree")
    if pairs.tokenizer_vocab > vocab_size:
        raise ConfigError(f"data.tokenizer_dir: the tokenizer has {pairs.tokenizer_vocab} tokens but {what} "
                          f"vocab_size is {vocab_size}: use the model's own tokenizer (or a model with a large enough vocabulary)")


def load_pairs(cfg: DataConfig, *, sft: bool = False, tokenizer: Any = None, show_progress: bool = False) -> TokenizedPairs:
    """Reads + validates + tokenizes ``cfg.train_path`` (cached under ``cfg.cache_dir`` by content hash).

    The fingerprint covers the data file, tokenizer files and length settings, so a changed input
    never reuses a stale cache. ``sft`` reads only prompt + chosen (or ``response``).
    """
    path = Path(cfg.train_path)
    if not path.is_file():
        raise FileNotFoundError(f"data.train_path: {path}: no such file")
    fields = ("prompt", "chosen") if sft else FIELDS
    fp, identity = _fingerprint(cfg, fields)
    identity = dict(identity, source=path.name)
    cache = Path(cfg.cache_dir) / f"pairs-{fp}" if cfg.cache_dir else None
    if cache is not None and cache.is_dir():
        manifest = verify_manifest(cache)
        arrays = {p.stem: np.load(p, allow_pickle=False) for p in sorted(cache.glob("*.npy"))}
        return TokenizedPairs(arrays, int(manifest["num_skipped"]), fp, identity, int(manifest.get("tokenizer_vocab", 0)))
    if tokenizer is None and cfg.tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    tokenizer_vocab = len(tokenizer) if tokenizer is not None else 0
    keep_end = cfg.truncation == "keep_end"
    cols: dict[str, list[list[int]]] = {f: [] for f in fields}
    lines: list[int] = []
    skipped = 0
    records = iter_records(path, yield_errors=cfg.skip_malformed)
    if show_progress:
        from tqdm import tqdm

        records = tqdm(records, desc=f"tokenize {path.name}", unit="rec")
    for line, rec in records:
        try:
            if isinstance(rec, RecordError):
                raise rec
            if sft and "chosen" not in rec and "chosen_ids" not in rec and "response" in rec:
                rec = dict(rec, chosen=rec["response"])
            ids = _encode_record(rec, path, line, tokenizer, fields)
            for f in fields[1:]:
                if not ids[f]:
                    raise RecordError(path, line, f, "empty response")
        except RecordError:
            if not cfg.skip_malformed:
                raise
            skipped += 1
            continue
        cols["prompt"].append(_truncate(ids["prompt"], cfg.max_prompt_len, keep_end))
        for f in fields[1:]:
            cols[f].append(ids[f][: cfg.max_response_len])
        lines.append(line)
    if not lines:
        raise ConfigError(f"data.train_path: {path}: no usable records ({skipped} malformed)")
    arrays = {"line": np.asarray(lines, np.int64)}
    for f, seqs in cols.items():
        arrays[f"{f}_tokens"] = np.asarray([t for s in seqs for t in s], np.int32)
        arrays[f"{f}_offsets"] = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    if cache is not None:
        with atomic_directory(cache, overwrite=True) as tmp:
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", arr, allow_pickle=False)
            write_manifest(tmp, {"format": CACHE_FORMAT, "fingerprint": fp, "num_skipped": skipped, "source": str(path),
                                 "tokenizer_vocab": tokenizer_vocab})
    return TokenizedPairs(arrays, skipped, fp, identity, tokenizer_vocab)
