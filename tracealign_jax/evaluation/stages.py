"""Cached pipeline stages: a stage whose inputs did not change is skipped on the next run.

Each stage writes into ``<run_dir>/<name>/`` and, last of all, ``<run_dir>/<name>/stage.json`` with
its key and result. The key is a hash of the stage's name, its own settings and the keys of the
stages it reads from, so changing a setting re-runs that stage and everything downstream of it,
while a second run with the same config skips every finished stage. A stage interrupted half-way
has no ``stage.json`` (or an old key) and runs again from scratch in a clean directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from tracealign_jax.atomic_io import atomic_write_json

STAGE_FILE = "stage.json"


def stage_key(name: str, settings: Any, upstream: tuple[str, ...] = ()) -> str:
    """16 hex chars identifying a stage's inputs (``settings`` must be JSON-serialisable)."""
    blob = json.dumps({"name": name, "settings": settings, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class StageRunner:
    """Runs named stages under ``run_dir`` with caching; ``log`` prints progress lines."""

    def __init__(self, run_dir: str | Path, log: Callable[[str], None] = print, force: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log, self.force = log, force
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def run(self, name: str, settings: Any, upstream: tuple[str, ...],
            fn: Callable[[Path], dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        """Runs ``fn(stage_dir) -> result`` unless a finished stage with the same key exists.

        Returns ``(key, result)``; ``result`` must be JSON-serialisable (paths as strings).
        """
        key = stage_key(name, settings, upstream)
        stage_dir = self.run_dir / name
        marker = stage_dir / STAGE_FILE
        if marker.is_file() and not self.force:
            done = json.loads(marker.read_text())
            if done.get("key") == key:
                self.log(f"[{name}] cached ({done['seconds']:.1f} s when it ran)")
                self.skipped.append(name)
                self.timings[name] = 0.0
                return key, done["result"]
        if stage_dir.exists():
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True)
        self.log(f"[{name}] running")
        t0 = time.perf_counter()
        result = fn(stage_dir)
        seconds = time.perf_counter() - t0
        atomic_write_json(marker, {"key": key, "seconds": seconds, "result": result})
        self.timings[name] = seconds
        self.log(f"[{name}] done in {seconds:.1f} s")
        return key, result
