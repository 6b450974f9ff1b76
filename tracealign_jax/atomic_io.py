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
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, interrupted: no partial temp file is left behind either
        tmp.unlink(missing_ok=True)
        raise


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


# ---- verified once, trusted while unchanged -----------------------------------------------------------
# A full SHA-256 pass over a large artifact (an index of billions of tokens) is too slow for every open,
# and a size check alone misses a flipped byte. So the first open checks every checksum and records each
# file's (size, mtime_ns, inode) in a small per-user cache; later opens re-hash only files whose stat
# changed (any write through the filesystem changes mtime). Media bit rot under an unchanged mtime is
# what ``tracealign index verify`` (a full pass) is for. The cache is keyed by the manifest's hash, so
# a renamed or moved artifact stays verified, and it is only a cache: unreadable or unwritable, every
# open simply verifies in full.
VERIFIED_CACHE_ENV = "TRACEALIGN_CACHE_DIR"
_MAX_CACHED = 256  # artifacts (manifest hashes)
_COPIES = 8  # verified copies remembered per artifact


def _verified_cache_path() -> Path:
    root = os.environ.get(VERIFIED_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tracealign")
    return Path(root) / "verified_artifacts.json"


def _stat_key(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _read_verified_cache() -> dict[str, Any]:
    try:
        data = json.loads(_verified_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_verified(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Records that every file of ``directory`` matches ``manifest`` as it is now (after a build or full check)."""
    directory = Path(directory)
    try:
        stats = {rel: _stat_key(directory / rel) for rel in manifest.get("files", {})}
        cache = _read_verified_cache()
        key = manifest_hash(manifest)
        copies = [c for c in cache.pop(key, []) if isinstance(c, dict) and c != stats]  # copies of one artifact
        cache[key] = (copies + [stats])[-_COPIES:]
        while len(cache) > _MAX_CACHED:
            cache.pop(next(iter(cache)))
        atomic_write_json(_verified_cache_path(), cache)
    except OSError:  # read-only home, full disk: the next open verifies in full again
        return


def verify_manifest_cached(directory: str | Path) -> dict[str, Any]:
    """``verify_manifest`` with checksums, skipping the hash of files unchanged since a verified open."""
    directory = Path(directory)
    manifest = verify_manifest(directory, checksums=False)
    copies = _read_verified_cache().get(manifest_hash(manifest), [])
    copies = [c for c in copies if isinstance(c, dict)] if isinstance(copies, list) else []
    hashed = 0
    for rel, info in manifest.get("files", {}).items():
        p = directory / rel
        if any(c.get(rel) == _stat_key(p) for c in copies):
            continue
        if sha256_file(p) != info["sha256"]:
            raise IntegrityError(f"{p}: SHA-256 differs from the manifest (corrupted or modified)")
        hashed += 1
    if hashed:
        remember_verified(directory, manifest)
    return manifest
