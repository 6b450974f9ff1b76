"""Reading user records (JSONL or Parquet) with errors that name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


class RecordError(ValueError):
    """A malformed input record; ``str()`` reads ``file:line: field: problem``."""

    def __init__(self, path: str | Path, line: int, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = str(path), line, field, problem
        where = f"{path}:{line}"
        super().__init__(f"{where}: {field}: {problem}" if field else f"{where}: {problem}")


def iter_records(path: str | Path, yield_errors: bool = False) -> Iterator[tuple[int, Any]]:
    """Yields ``(line_number, record)`` from a .jsonl/.json-lines or .parquet file (lines 1-based;
    for Parquet the row number + 1). Blank JSONL lines are skipped; a line that is not a JSON object
    raises RecordError, or with ``yield_errors`` is yielded as ``(line, RecordError)`` so a caller that
    skips malformed records still reads the lines after it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist()):
            yield i + 1, row
        return
    # Bytes, split on "\n" only: text mode would also split at a bare "\r" inside a record (shifting
    # every later line number) and raise a UnicodeDecodeError naming no line on invalid UTF-8.
    with open(path, "rb") as f:
        for i, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise RecordError(path, i, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte column "
                                                     f"{err.start + 1})") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    col = err.colno  # characters; editors that count bytes see another column after non-ASCII text
                    byte = len(line[: err.pos].encode("utf-8")) - len(line[: err.pos - col + 1].encode("utf-8")) + 1
                    at = f"column {col}" + (f", byte {byte}" if byte != col else "")
                    raise RecordError(path, i, None, f"not valid JSON ({err.msg} at {at})") from None
                if not isinstance(rec, dict):
                    raise RecordError(path, i, None, f"expected a JSON object, got {type(rec).__name__}")
            except RecordError as err:
                if not yield_errors:
                    raise
                yield i, err
                continue
            yield i, rec


def require(rec: dict[str, Any], field: str, kind: type | tuple[type, ...], path: str | Path, line: int) -> Any:
    """``rec[field]`` if present and of ``kind``, else RecordError naming file, line and field."""
    if field not in rec or rec[field] is None:
        raise RecordError(path, line, field, "missing")
    value = rec[field]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RecordError(path, line, field, f"expected {names}, got {type(value).__name__}")
    return value
