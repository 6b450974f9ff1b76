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
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise RecordError(path, i, None, f"expected a JSON object, got {type(rec).__name__}")
            except (json.JSONDecodeError, RecordError) as err:
                if isinstance(err, json.JSONDecodeError):
                    err = RecordError(path, i, None, f"not valid JSON ({err.msg} at column {err.colno})")
                if not yield_errors:
                    raise err from None
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
