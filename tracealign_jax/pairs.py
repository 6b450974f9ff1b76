"""Tokenized preference pairs: read, validate, tokenize once (``datasets.map``, Arrow-cached by fingerprint).

Shared by training (batches) and provenance (per-token BCI of the same response tokens), so neither
imports the other. Sources and layouts (JSONL, Parquet, ``save_to_disk`` folders, cached Hub ids; TRL,
PKU-SafeRLHF, UltraFeedback) are ``preference_sources``'; each record becomes one canonical pair:
  strings        {"prompt": str, "chosen": str, "rejected": str}
  conversations  {"prompt": [{"role", "content"}, ...], "chosen": str | [messages], "rejected": ...}
                 rendered with the tokenizer's chat template (the response is what the template adds
                 after the generation prompt)
  token ids      {"prompt_ids": [int], "chosen_ids": [int], "rejected_ids": [int]} (no tokenizer)
For SFT only ``prompt`` + ``chosen`` (or ``response`` / ``completion``) are needed. A malformed record
raises ``RecordError`` naming file, line (record number for Parquet / saved datasets) and field before
any training, unless ``data.skip_malformed`` (then it is skipped and counted in ``num_skipped``).

Truncation: responses keep their start (at most ``max_response_len`` tokens); an over-long prompt
keeps its end (``truncation: keep_end``, the tokens next to the response) or its start (``keep_start``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from tracealign_jax import preference_sources as sources
from tracealign_jax.atomic_io import atomic_directory, sha256_file, verify_manifest, write_manifest
from tracealign_jax.chat import check_messages
from tracealign_jax.config import ConfigError, DataConfig, check_columns
from tracealign_jax.records import RecordError, require

FIELDS = ("prompt", "chosen", "rejected")
CACHE_FORMAT = "tracealign-pref-tokens-v1"  # the token ids; unchanged since v1, so older artifacts stay valid
NO_TEMPLATE = "a conversation needs a chat template"


@dataclass
class TokenizedPairs:
    """Tokenized dataset as flat arrays: ``<f>_tokens`` int32 concatenated, ``<f>_offsets`` int64[N+1]."""

    arrays: dict[str, np.ndarray]
    num_skipped: int = 0
    fingerprint: str = ""
    identity: dict = dataclasses.field(default_factory=dict)  # what the fingerprint hashes (data file, tokenizer, lengths)
    tokenizer_vocab: int = 0  # len(tokenizer) of data.tokenizer_dir (0: token-id records, no tokenizer)
    num_truncated: dict[str, int] = dataclasses.field(default_factory=dict)  # field -> records cut to the length limit

    def __len__(self) -> int:
        return len(self.arrays["prompt_offsets"]) - 1

    def get(self, field: str, i: int) -> np.ndarray:
        off = self.arrays[f"{field}_offsets"]
        return self.arrays[f"{field}_tokens"][off[i] : off[i + 1]]

    def lengths(self, field: str) -> np.ndarray:
        return np.diff(self.arrays[f"{field}_offsets"])


def _nonempty(value: Any, path: Path, line: int, field: str) -> Any:
    """A response that is empty or only whitespace would train on EOS alone: refused like any malformed field."""
    if isinstance(value, str) and not value.strip() or isinstance(value, list) and not value:
        raise RecordError(path, line, field, "empty response")
    return value


def _render(tokenizer: Any, msgs: list[dict], path: Path, line: int, field: str, **kw: Any) -> str:
    """The chat template's text of ``msgs``; a template that refuses them is the record's error, not a traceback."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
    except (jinja2.TemplateError, ValueError, TypeError) as err:  # e.g. the template's raise_exception("roles must alternate")
        raise RecordError(path, line, field, f"the chat template refuses this conversation: {err}") from None


@dataclass(frozen=True)
class Text:
    """A text to tokenize: with the tokenizer's special tokens (a string prompt's BOS) or not; EOS appended
    (string responses; a chat template writes its own end-of-turn)."""

    text: str
    special: bool
    eos: bool


def _segments(rec: dict, path: Path, line: int, tokenizer: Any, fields: Sequence[str]) -> dict[str, Any]:
    """What to tokenize for one canonical pair: per field its token ids (id records) or a ``Text``."""
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
    if isinstance(prompt, list):
        msgs = check_messages(prompt, path, line, "prompt")
        if getattr(tokenizer, "chat_template", None) is None:
            raise RecordError(path, line, "prompt", f"{NO_TEMPLATE} and data.tokenizer_dir has none: use the "
                                                    "model's chat (instruct) tokenizer, or add a chat_template to its "
                                                    "tokenizer_config.json (or chat_template.jinja), or give the "
                                                    "prompt and responses as strings")  # fmt: skip
        prompt_text = _render(tokenizer, msgs, path, line, "prompt", add_generation_prompt=True)
        out = {"prompt": Text(prompt_text, special=False, eos=False)}
        for f in fields[1:]:
            resp = _nonempty(require(rec, f, (str, list), path, line), path, line, f)
            turn = [{"role": "assistant", "content": resp}] if isinstance(resp, str) else check_messages(resp, path, line, f)
            full = _render(tokenizer, msgs + turn, path, line, f)
            if not full.startswith(prompt_text):
                raise RecordError(path, line, f, "chat template does not extend the prompt rendering")
            out[f] = Text(full[len(prompt_text) :], special=False, eos=False)
        return out
    out = {"prompt": Text(prompt, special=True, eos=False)}  # special tokens (BOS) belong to the prompt
    for f in fields[1:]:
        out[f] = Text(_nonempty(require(rec, f, str, path, line), path, line, f), special=False, eos=True)
    return out


def _tokenize_batch(batch: dict[str, list], *, tokenizer: Any, fmt: str, cfg: DataConfig, path: str, sft: bool,
                    fields: Sequence[str]) -> dict[str, list]:  # fmt: skip
    """``datasets.map`` function (batched): converts each record, tokenizes the batch's texts in two
    tokenizer calls (with / without special tokens), truncates. A malformed record yields empty id lists
    and its error (``error_field``, ``error``) instead of stopping the map."""
    extras = sources.EXTRAS.get(fmt, {})
    out: dict[str, list] = {k: [] for k in [f"{f}_ids" for f in fields] + ["line", "cut", "error_field", "error", *extras]}
    rows = []  # (line, segments | RecordError, extras)
    for line, rec in sources.records(batch):
        try:
            pair, values = sources.to_pair(rec, fmt, cfg, path, line, sft)
            rows.append((line, _segments(pair, path, line, tokenizer, fields), values))
        except RecordError as e:
            rows.append((line, e, {}))
    texts = [seg for _, segs, _ in rows if isinstance(segs, dict) for seg in segs.values() if isinstance(seg, Text)]
    encoded = {flag: iter(tokenizer([t.text for t in texts if t.special == flag], add_special_tokens=flag)["input_ids"])
               for flag in (True, False) if any(t.special == flag for t in texts)}  # fmt: skip
    eos = [tokenizer.eos_token_id] if tokenizer is not None and tokenizer.eos_token_id is not None else []
    keep_end = cfg.truncation == "keep_end"
    for line, segs, values in rows:
        if isinstance(segs, dict):  # consume this record's encodings in order, even if it turns out malformed
            segs = {f: next(encoded[s.special]) + (eos if s.eos else []) if isinstance(s, Text) else s for f, s in segs.items()}
            empty = [f for f in fields[1:] if not segs[f]]
            if empty:
                segs = RecordError(path, line, empty[0], "empty response")
        if isinstance(segs, RecordError):
            ids, values, err, cut = {f: [] for f in fields}, {}, (segs.field or "", segs.problem), 0
        else:
            ids = {f: _truncate(v, cfg.max_prompt_len, keep_end) if f == "prompt" else v[: cfg.max_response_len]
                   for f, v in segs.items()}  # fmt: skip
            err, cut = ("", ""), sum(1 << i for i, f in enumerate(fields) if len(ids[f]) < len(segs[f]))
        for f in fields:
            out[f"{f}_ids"].append(ids[f])
        for k in extras:
            out[k].append(values.get(k, -1))
        out["line"].append(line)
        out["cut"].append(cut)
        out["error_field"].append(err[0])
        out["error"].append(err[1])
    return out


def _truncate(ids: list[int], n: int, keep_end: bool) -> list[int]:
    return ids[-n:] if keep_end and len(ids) > n else ids[:n]


def _fingerprint(cfg: DataConfig, fields: Sequence[str], src: "sources.Source") -> tuple[str, dict]:
    """(16-hex fingerprint, what it hashes): data content, tokenizer files, layout and length settings."""
    tok_hash = ""
    if cfg.tokenizer_dir:
        h = hashlib.sha256()
        for p in sorted(Path(cfg.tokenizer_dir).glob("*")):
            if p.is_file() and p.suffix in (".json", ".model", ".txt", ".jinja"):
                h.update(p.name.encode() + sha256_file(p).encode())
        tok_hash = h.hexdigest()
    key = dict(format=CACHE_FORMAT, data=src.digest, tok=tok_hash, fields=list(fields),
               prompt=cfg.max_prompt_len, response=cfg.max_response_len, trunc=cfg.truncation, skip=cfg.skip_malformed)  # fmt: skip
    if src.format != "trl" or cfg.columns:  # absent for plain TRL records, so their older artifacts stay valid
        key.update(layout=src.format, columns=dict(sorted(cfg.columns.items())))
        if src.format == "pku_saferlhf":
            key["pku"] = cfg.pku_preference
    if not Path(cfg.train_path).is_file():  # a saved DatasetDict or a Hub id: which split
        key["split"] = cfg.split
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16], key


_IDENTITY_NAMES = {"data": "preference file contents (SHA-256)", "tok": "tokenizer files", "fields": "fields",
                   "layout": "data.format", "columns": "data.columns", "pku": "data.pku_preference", "split": "data.split",
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
    """Reads + validates + tokenizes ``cfg.train_path`` with ``datasets.map`` (see ``preference_sources``).

    With ``cfg.cache_dir`` the source's Arrow conversion and the tokenized Arrow table are cached there;
    the tokens sit in ``tokens-<fingerprint>/`` (with a checksummed manifest), and the fingerprint covers
    the data, tokenizer files, layout and length settings, so a changed input never reuses a stale cache
    and an unchanged one is not tokenized again. ``sft`` reads only prompt + chosen (or ``response``).
    """
    import datasets

    check_columns(cfg.columns)
    (datasets.enable_progress_bars if show_progress else datasets.disable_progress_bars)()
    fields = ("prompt", "chosen") if sft else FIELDS
    hf_cache = str(Path(cfg.cache_dir) / "datasets") if cfg.cache_dir else None
    src = sources.open_source(cfg, hf_cache)
    fp, identity = _fingerprint(cfg, fields, src)
    identity = dict(identity, source=Path(src.path).name)
    cache = Path(cfg.cache_dir) / f"tokens-{fp}" if cfg.cache_dir else None
    if tokenizer is None and cfg.tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_dir)
    n = len(src.dataset)
    num_proc = cfg.num_proc or (min(8, os.cpu_count() or 1) if n >= 20_000 else 1)
    value = datasets.Value
    features = datasets.Features({**{f"{f}_ids": datasets.List(value("int32")) for f in fields}, "line": value("int64"), "cut": value("int8"),
                                  "error_field": value("string"), "error": value("string"),
                                  **{k: value(v) for k, v in sources.EXTRAS.get(src.format, {}).items()}})  # fmt: skip
    map_kw = dict(batched=True, features=features, remove_columns=src.dataset.column_names, new_fingerprint=fp,
                  desc=f"tokenize {Path(src.path).name}", num_proc=num_proc if num_proc > 1 and n > 1 else None,
                  fn_kwargs=dict(tokenizer=tokenizer, fmt=src.format, cfg=cfg, path=src.path, sft=sft, fields=fields))  # fmt: skip
    vocab = len(tokenizer) if tokenizer is not None else 0
    with _spawned_workers():
        return _map_cached(src, cache, map_kw, cfg, fields, fp, identity, vocab)


@contextlib.contextmanager
def _spawned_workers() -> Iterator[None]:
    """``datasets.map(num_proc=...)`` forks its workers by default; a fork of a process that runs JAX's
    threads can deadlock, so they are spawned (fresh interpreters) instead."""
    import multiprocess

    before = multiprocess.get_start_method(allow_none=True)
    multiprocess.set_start_method("spawn", force=True)
    try:
        yield
    finally:
        multiprocess.set_start_method(before, force=True)


def _map_cached(src: "sources.Source", cache: Path | None, map_kw: dict, cfg: DataConfig, fields: Sequence[str], fp: str,
                identity: dict, vocab: int) -> TokenizedPairs:  # fmt: skip
    """Runs the tokenizing map into ``cache`` (verified, reused when there) or in memory."""
    if cache is None:
        return _to_pairs(src.dataset.map(_tokenize_batch, keep_in_memory=True, **map_kw), cfg, src, fields, fp, identity, vocab)
    if cache.is_dir() and verify_manifest(cache).get("num_proc") == map_kw["num_proc"]:  # shard files per worker
        table = src.dataset.map(_tokenize_batch, cache_file_name=str(cache / "tokens.arrow"), load_from_cache_file=True, **map_kw)
        return _to_pairs(table, cfg, src, fields, fp, identity, vocab)
    with atomic_directory(cache, overwrite=True) as tmp:
        pairs = _to_pairs(src.dataset.map(_tokenize_batch, cache_file_name=str(tmp / "tokens.arrow"), **map_kw), cfg, src,
                          fields, fp, identity, vocab)  # fmt: skip
        write_manifest(tmp, {"format": CACHE_FORMAT, "fingerprint": fp, "source": src.path, "records": len(src.dataset),
                             "num_proc": map_kw["num_proc"]})  # fmt: skip
    return pairs


def _to_pairs(table: Any, cfg: DataConfig, src: "sources.Source", fields: Sequence[str], fp: str, identity: dict,
              tokenizer_vocab: int) -> TokenizedPairs:  # fmt: skip
    """Flat arrays (``TokenizedPairs``) of the tokenized table; raises the first record error unless skipping."""
    import pyarrow.compute as pc

    data = table.data.table
    errors = np.asarray(data.column("error").to_pylist(), dtype=object)
    bad = np.flatnonzero(errors != "")
    lines = np.asarray(data.column("line").to_numpy(), np.int64)
    skipped = len(bad) + len(src.unreadable)
    if skipped and not cfg.skip_malformed:  # the first malformed record in file order
        first = [RecordError(src.path, int(lines[bad[0]]), data.column("error_field")[int(bad[0])].as_py() or None,
                             str(errors[bad[0]]))] if len(bad) else []  # fmt: skip
        raise min(first + list(src.unreadable[:1]), key=lambda e: e.line)
    ok = errors == ""
    if not ok.any():
        raise ConfigError(f"data.train_path: {src.path}: no usable records ({skipped} malformed)")
    arrays = {"line": lines[ok]}
    for f in fields:
        col = data.column(f"{f}_ids").combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)[ok]  # malformed rows have no tokens
        arrays[f"{f}_tokens"] = np.array(col.flatten().to_numpy(zero_copy_only=False), np.int32)  # a copy, not the mmap
        arrays[f"{f}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for name, dtype in sources.EXTRAS.get(src.format, {}).items():
        arrays[name] = np.asarray(data.column(name).to_numpy(zero_copy_only=False), dtype)[ok]
    cut = np.asarray(data.column("cut").to_numpy(zero_copy_only=False))[ok]
    truncated = {f: int(np.count_nonzero(cut & (1 << i))) for i, f in enumerate(fields)}
    limits = {f: f"data.max_prompt_len={cfg.max_prompt_len}" if f == "prompt" else f"data.max_response_len={cfg.max_response_len}"
              for f in fields}  # fmt: skip
    for f, n in truncated.items():
        if n:
            print(f"warning: {src.path}: {n} of {int(ok.sum())} {f} texts are cut to {limits[f]} tokens; raise it "
                  "(`tracealign config new` sizes the lengths to the data)", file=sys.stderr)  # fmt: skip
    return TokenizedPairs(arrays, skipped, fp, identity, tokenizer_vocab, truncated)
