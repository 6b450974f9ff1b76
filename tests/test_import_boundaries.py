"""The host/device boundary and the package layering, checked on the imports themselves.

Jitted code (model, training step and losses, decoding, the veto lookup) must not load the host-side
index or tensorstore. Training and provenance never import each other: what they share (tokenized
pairs, the per-response array store, the veto table) sits below both.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JITTED = ("tracealign_jax.model", "tracealign_jax.training.step", "tracealign_jax.training.losses",
          "tracealign_jax.training.logprobs", "tracealign_jax.decoding", "tracealign_jax.veto.table")  # fmt: skip


def test_jitted_modules_load_neither_the_index_nor_tensorstore():
    code = ("import importlib, sys\n"
            f"for name in {JITTED!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'tensorstore' or m.startswith('tracealign_jax.index')))")  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _imported(package: str) -> dict[str, set[str]]:
    """File -> the tracealign_jax modules it imports (at top level or inside functions)."""
    found = {}
    for path in sorted((ROOT / "tracealign_jax" / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        found[path.name] = {n for n in names if n.startswith("tracealign_jax.")}
    return found


def test_training_and_provenance_do_not_import_each_other():
    for package, other in (("training", "provenance"), ("provenance", "training")):
        for path, names in _imported(package).items():
            assert not [n for n in names if n.startswith(f"tracealign_jax.{other}")], (package, path, names)


def test_the_shared_modules_sit_below_both():
    for package in ("veto",):
        for path, names in _imported(package).items():
            assert all(n.startswith(("tracealign_jax.veto", "tracealign_jax.atomic_io")) for n in names), (path, names)
    for module in ("pairs.py", "response_store.py"):
        tree = ast.parse((ROOT / "tracealign_jax" / module).read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not [n for n in names if n.startswith(("tracealign_jax.training", "tracealign_jax.provenance"))], names
