"""Where preference records come from and what layout they have: opened through Hugging Face ``datasets``
and converted, record by record, to one canonical pair ``{"prompt", "chosen", "rejected"}``.

Sources (``data.train_path``):
  a ``.jsonl`` / ``.json`` file, a ``.parquet`` file, a ``Dataset.save_to_disk`` directory (a
  ``DatasetDict`` one takes ``data.split``), or a Hub id (``org/name``, with ``data.split``) read from the
  local HF datasets cache only (no download: a machine without network reuses what is cached).
  Records are numbered like the errors that name them: the JSONL line (1-based), or for Parquet, saved
  datasets and Hub ids the record index + 1.
Formats (``data.format``; ``auto`` picks one from the columns; ``data.columns`` renames columns first):
  trl                      TRL's preference type, standard (strings) or conversational (message lists),
                           with an explicit ``prompt`` or an implicit one (only ``chosen``/``rejected``: the
                           prompt is their shared prefix, as TRL's ``extract_prompt`` takes it); token-id
                           records ``prompt_ids``/``chosen_ids``/``rejected_ids`` are accepted too.
  pku_saferlhf             ``prompt``, ``response_0``/``response_1``, ``better_response_id``,
                           ``safer_response_id``, ``is_response_{0,1}_safe``; the pair is ordered by
                           ``data.pku_preference`` (safer | better); the safety labels ride along.
  ultrafeedback_binarized  ``prompt`` (str), ``chosen``/``rejected`` message lists that start with the user
                           turn, ``score_chosen``/``score_rejected`` (kept as per-pair values).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from tracealign_jax.atomic_io import sha256_file
from tracealign_jax.chat import check_messages
from tracealign_jax.config import ConfigError, DataConfig
from tracealign_jax.records import RecordError, iter_records, require

LINE = "__line__"  # record number column added to every source (JSONL line, else index + 1)
RECORD = "__record__"  # a whole JSONL record as JSON text, for files whose fields mix types (see _load_jsonl)
FORMATS = ("trl", "pku_saferlhf", "ultrafeedback_binarized")
# Per-pair values a format carries besides the text, with their NumPy dtype (TokenizedPairs.arrays[name]).
EXTRAS = {"pku_saferlhf": {"chosen_safe": "int8", "rejected_safe": "int8"},
          "ultrafeedback_binarized": {"score_chosen": "float32", "score_rejected": "float32"}}  # fmt: skip
CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "response", "completion", "prompt_ids", "chosen_ids",
                     "rejected_ids", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe",
                     "better_response_id", "safer_response_id", "score_chosen", "score_rejected")  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class Source:
    """An opened source: ``dataset`` has the (renamed) columns plus ``LINE``; ``digest`` identifies its content."""

    dataset: Any  # datasets.Dataset
    path: str  # what errors name (the file, directory or Hub id)
    digest: str  # SHA-256 of the data files (Hub: the datasets fingerprint of the cached split)
    format: str  # resolved: one of FORMATS
    unreadable: tuple = ()  # RecordError of each JSONL line that is no JSON object (raised in file order)


def open_source(cfg: DataConfig, cache_dir: str | None) -> Source:
    """Opens ``cfg.train_path`` as a ``datasets.Dataset``. A file's Arrow conversion is cached under
    ``cache_dir/<content hash>`` (a changed file never meets a stale conversion); None: built in memory."""
    path = Path(cfg.train_path)
    unreadable: list[RecordError] = []
    if path.is_file():
        digest = sha256_file(path)
        cache_dir = str(Path(cache_dir) / digest[:16]) if cache_dir else None
        if path.suffix == ".parquet":
            ds = _load("parquet", path, cache_dir)
            ds = ds.add_column(LINE, list(range(1, len(ds) + 1)))
        else:
            ds, unreadable = _load_jsonl(path, cfg.columns, cache_dir)
    elif path.is_dir():
        ds, path, digest = _load_saved(path, cfg.split)
        ds = ds.add_column(LINE, list(range(1, len(ds) + 1)))
    elif _HUB_ID.match(cfg.train_path) and not cfg.train_path.endswith((".jsonl", ".json", ".parquet")):
        ds = _load_hub(cfg.train_path, cfg.split)
        digest = ds._fingerprint
        ds = ds.add_column(LINE, list(range(1, len(ds) + 1)))
    else:
        raise FileNotFoundError(f"data.train_path: {path}: no such file or directory (nor a Hub dataset id)")
    if RECORD in ds.column_names:  # renamed while read; the columns are the records' keys
        names = sorted({k for text in ds[RECORD] for k in json.loads(text)})
        first = json.loads(ds[0][RECORD]) if len(ds) else {}
    else:
        ds = _rename(ds, cfg.columns, str(path))
        names, first = ds.column_names, ds[0] if len(ds) else {}
    fmt = cfg.format if cfg.format != "auto" else detect_format(names, first, str(path))
    return Source(ds, str(path), digest, fmt, tuple(unreadable))


@contextlib.contextmanager
def _quiet_builder() -> Iterator[None]:
    """Keeps ``datasets``' own error log and split-generation bar off stderr while a file is read: a file it
    cannot read is our one-line error (or a line-by-line re-read), not its traceback-laden log."""
    import datasets

    level, bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.logging.set_verbosity(logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _load(builder: str, path: Path, cache_dir: str | None) -> Any:
    """``datasets``' packaged ``json`` / ``parquet`` builder on one file; a Parquet file it cannot read is
    a one-line error (JSONL failures are diagnosed line by line in ``_load_jsonl``)."""
    import datasets
    import pyarrow as pa

    with tempfile.TemporaryDirectory() as tmp, _quiet_builder():  # no cache_dir: a temporary cache, kept in memory
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir or tmp,
                                         keep_in_memory=cache_dir is None)  # fmt: skip
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowException) as err:
            if builder == "json":
                raise
            raise RecordError(path, 0, None, f"not a readable {builder} file ({err.__cause__ or err})") from None


def _load_jsonl(path: Path, columns: dict, cache_dir: str | None) -> tuple[Any, list[RecordError]]:
    """JSONL through ``datasets``' JSON builder. A file it cannot read (invalid JSON or UTF-8, a line that
    is not an object) is re-read line by line: the readable records, and an error naming each bad line.
    So is a file whose fields mix types (a string prompt here, a message list there): ``datasets`` gives
    such a field its ``Json`` type, which decodes strings that look like JSON ("7", "true") into numbers
    and booleans; these files keep each record whole, as JSON text in one ``RECORD`` column."""
    import datasets

    try:
        with open(path, "rb") as f:  # the builder skips blank lines (number records by the lines it reads)
            lines = [i for i, raw in enumerate(f, start=1) if raw.strip() and raw.decode("utf-8")]  # and reads bad UTF-8
        ds = _load("json", path, cache_dir)
        if len(lines) == len(ds) and "Json(" not in repr(ds.features):
            return ds.add_column(LINE, lines), []
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError, ValueError):
        return _load_jsonl_by_line(path, columns)
    return _load_jsonl_by_line(path, columns)


def _load_jsonl_by_line(path: Path, columns: dict) -> tuple[Any, list[RecordError]]:
    """The readable records of a JSONL file, each kept whole as JSON text (``RECORD``), and an error per bad line."""
    import datasets

    rows, errors = [], []
    for line, rec in iter_records(path, yield_errors=True):
        if isinstance(rec, RecordError):
            errors.append(rec)
        else:
            rows.append((line, json.dumps(_rename_record(rec, columns))))
    return datasets.Dataset.from_dict({LINE: [r[0] for r in rows], RECORD: [r[1] for r in rows]},
                                      features=datasets.Features({LINE: datasets.Value("int64"),
                                                                  RECORD: datasets.Value("string")})), errors  # fmt: skip


def _load_saved(path: Path, split: str) -> tuple[Any, Path, str]:
    """A ``save_to_disk`` directory (Dataset, or DatasetDict + ``split``), its split's folder and the
    SHA-256 of its data files."""
    import datasets

    if not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"data.train_path: {path}: a directory, but not a `datasets` save_to_disk folder "
                                "(no state.json or dataset_dict.json)")  # fmt: skip
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"data.split: {split!r} is not a split of {path} (splits: {sorted(ds)})")
        ds, path = ds[split], path / split
    h = hashlib.sha256()
    for p in sorted(path.glob("*.arrow")):
        h.update(p.name.encode() + sha256_file(p).encode())
    return ds, path, h.hexdigest()


def _load_hub(name: str, split: str) -> Any:
    """A Hub dataset from the local HF cache, offline (``datasets`` would otherwise retry the network)."""
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"data.train_path: {name!r} is no local file or directory, and the Hub dataset "
                                f"{name} (split {split!r}) is not in the HF datasets cache "
                                f"({datasets.config.HF_DATASETS_CACHE}): run `datasets.load_dataset({name!r}, "
                                f"split={split!r})` once on a machine with network, or give a local path "
                                f"[{type(err).__name__}]") from None  # fmt: skip
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _rename(ds: Any, columns: dict, where: str) -> Any:
    """Applies ``data.columns`` ({canonical name: dataset column}); a column already named like a target is
    dropped first (the mapping says which one is meant)."""
    if not columns:
        return ds
    missing = {k: v for k, v in columns.items() if v not in ds.column_names}
    if missing:
        k, v = next(iter(missing.items()))
        raise ConfigError(f"data.columns.{k}: column {v!r} is not in {where} (columns: {sorted(set(ds.column_names) - {LINE})})")
    shadowed = [k for k in columns if k in ds.column_names and k not in columns.values()]
    return ds.remove_columns(shadowed).rename_columns({v: k for k, v in columns.items() if v != k})


def _rename_record(rec: dict, columns: dict) -> dict:
    """``_rename`` of one record."""
    inverse = {v: k for k, v in columns.items()}
    return {inverse.get(k, k): v for k, v in rec.items() if k in inverse or k not in columns}


def records(batch: dict[str, list]) -> list[tuple[int, dict]]:
    """(record number, record) of each row of a ``datasets`` batch (a ``RECORD`` row decoded from its JSON)."""
    if RECORD in batch:
        return [(line, json.loads(text)) for line, text in zip(batch[LINE], batch[RECORD])]
    return [(line, {k: v[i] for k, v in batch.items() if k != LINE}) for i, line in enumerate(batch[LINE])]


def detect_format(columns: Sequence[str], first: dict, where: str) -> str:
    """The format from the column names (and the first record's types where names alone are ambiguous)."""
    cols = set(columns)
    if {"response_0", "response_1"} <= cols:
        return "pku_saferlhf"
    if {"score_chosen", "score_rejected", "chosen"} <= cols:
        if isinstance(first.get("prompt"), str) and isinstance(first.get("chosen"), list):
            return "ultrafeedback_binarized"
    if cols & {"chosen", "chosen_ids", "response", "completion"}:
        return "trl"
    raise ConfigError(f"data.format: cannot tell the layout of {where} from its columns "
                      f"{sorted(cols - {LINE})}: set data.format ({' | '.join(FORMATS)}) and map columns "
                      "with data.columns")  # fmt: skip


def to_pair(rec: dict, fmt: str, cfg: DataConfig, path: str, line: int, sft: bool) -> tuple[dict, dict]:
    """(canonical pair, extras) of one record in format ``fmt``. The pair has ``prompt``/``chosen``/``rejected``
    (strings, message lists, or the ``*_ids`` token-id fields); extras are the format's EXTRAS values."""
    rec = {k: v for k, v in rec.items() if v is not None}  # Arrow fills absent fields with None
    if fmt == "pku_saferlhf":
        key = f"{cfg.pku_preference}_response_id"
        pick = require(rec, key, int, path, line)
        if pick not in (0, 1):
            raise RecordError(path, line, key, f"expected 0 or 1, got {pick}")
        safe = [require(rec, f"is_response_{i}_safe", bool, path, line) for i in (0, 1)]
        pair = {"prompt": rec.get("prompt"), "chosen": require(rec, f"response_{pick}", str, path, line),
                "rejected": require(rec, f"response_{1 - pick}", str, path, line)}  # fmt: skip
        return pair, {"chosen_safe": int(safe[pick]), "rejected_safe": int(safe[1 - pick])}
    if fmt == "ultrafeedback_binarized":
        chosen, rejected = (check_messages(require(rec, f, list, path, line), path, line, f) for f in ("chosen", "rejected"))
        pair = implicit_prompt(chosen, rejected, path, line)
        user = [m for m in pair["prompt"] if m["role"] == "user"]
        if "prompt" in rec and (not user or user[-1]["content"] != rec["prompt"]):
            raise RecordError(path, line, "prompt", "differs from the last user turn shared by chosen and rejected")
        extras = {f: float(require(rec, f, (int, float), path, line)) for f in ("score_chosen", "score_rejected")}
        return pair, extras
    if sft and "chosen" not in rec and "chosen_ids" not in rec:
        for alias in ("response", "completion"):
            if alias in rec:
                return dict(rec, chosen=rec[alias]), {}
    if "prompt" in rec or "prompt_ids" in rec or "chosen" not in rec or sft and "rejected" not in rec:
        return rec, {}
    chosen, rejected = require(rec, "chosen", (str, list), path, line), require(rec, "rejected", (str, list), path, line)
    if isinstance(chosen, list) and isinstance(rejected, list):
        chosen, rejected = check_messages(chosen, path, line, "chosen"), check_messages(rejected, path, line, "rejected")
    elif not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise RecordError(path, line, "rejected", "chosen and rejected must both be strings or both message lists")
    return implicit_prompt(chosen, rejected, path, line), {}


def implicit_prompt(chosen: Any, rejected: Any, path: str, line: int) -> dict:
    """TRL's implicit prompt: the longest common prefix of ``chosen`` and ``rejected`` (characters of two
    strings, or leading messages of two conversations); the rest of each is its response. For strings a
    space before the split point goes to the responses (TRL's ``extract_prompt``: "The sky is" / " blue.")."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if idx == n:
        raise RecordError(path, line, "rejected", "chosen and rejected are equal or one extends the other: "
                                                  "no response to compare (give an explicit prompt)")  # fmt: skip
    if isinstance(chosen, str) and idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    if idx == 0:
        raise RecordError(path, line, "prompt", "missing, and chosen and rejected share no prefix to take it from")
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def text_pairs(cfg: DataConfig) -> tuple[list[int], list[dict]]:
    """(record numbers, records) of a preference source as plain string pairs plus the format's extras and
    the record's other fields (what ``realign triage`` judges); malformed records raise ``RecordError``."""
    import datasets

    datasets.disable_progress_bars()
    src = open_source(cfg, None)
    consumed = {"prompt", "chosen", "rejected"} | (set(CANONICAL_COLUMNS) if src.format == "pku_saferlhf" else set())
    lines, recs, unreadable = [], [], list(src.unreadable)
    for line, row in records(src.dataset.to_dict()):
        if unreadable and unreadable[0].line < line:  # errors in file order
            raise unreadable[0]
        pair, extras = to_pair(row, src.format, cfg, src.path, line, sft=False)
        for f in ("prompt", "chosen", "rejected"):
            require(pair, f, str, src.path, line)
        rest = {k: v for k, v in row.items() if k not in consumed and v is not None}
        lines.append(line)
        recs.append({**rest, **{f: pair[f] for f in ("prompt", "chosen", "rejected")}, **extras})
    if unreadable:
        raise unreadable[0]
    if not recs:
        raise RecordError(src.path, 0, None, "no records")
    return lines, recs
