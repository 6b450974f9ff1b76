"""Atomic writes and checksummed manifests: a crash never leaves a half-written artifact that loads.

Files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on POSIX).
Directories (an index, a veto table, an export) are built in ``<dest>.tmp-<pid>`` and renamed when
complete. A ``manifest.json`` lists every file with its size and SHA-256; ``verify_manifest`` refuses
a missing, truncated or modified file, naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

MANIFEST = "manifest.json"


class IntegrityError(RuntimeError):
    """An artifact on disk is missing, truncated, corrupted or does not match what the caller expects."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temp file + fsync + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> None:
    """One JSON object per line (keys sorted), written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


@contextlib.contextmanager
def atomic_directory(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temp directory; on clean exit it replaces ``dest``, on error it is removed.

    ``dest`` is untouched until the very end, so an interrupted build leaves the old artifact (or none).
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists (pass overwrite=True / --overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Writes ``manifest.json`` = ``meta`` + {"files": {relpath: {bytes, sha256}}} for every file below."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(directory).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    manifest = dict(meta, files=files)
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def manifest_hash(manifest: dict[str, Any]) -> str:
    """A short stable identity of an artifact: SHA-256 of its canonical manifest JSON (16 hex chars)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{path}: missing manifest (not a complete artifact, or built by another tool)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IntegrityError(f"{path}: manifest is not valid JSON ({err})") from err


def verify_manifest(directory: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Reads the manifest and checks each listed file's presence, size and (optionally) SHA-256."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    for rel, info in manifest.get("files", {}).items():
        p = directory / rel
        if not p.is_file():
            raise IntegrityError(f"{p}: listed in the manifest but missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise IntegrityError(f"{p}: {size} bytes on disk, manifest says {info['bytes']} (truncated or replaced)")
        if checksums and sha256_file(p) != info["sha256"]:
            raise IntegrityError(f"{p}: SHA-256 differs from the manifest (corrupted or modified)")
    return manifest
