"""Provenance: BCI scoring, TraceShield, the drift bound and the precomputed arrays jitted code uses.

Host-side modules (``bci``, ``calibrate``, ``shield``, ``bound``, ``token_bci`` writers, ``veto_build``)
take a ``tracealign_jax.index.TraceIndex`` object as an argument; none imports the index package, so
jitted code (training, decoding) can import ``veto_table`` without pulling host machinery in.
"""

import importlib
from typing import Any

# Light (NumPy only) and eager: the function ``calibrate`` shares its name with its module, and a lazy
# attribute would be shadowed by the module once anything imports ``provenance.calibrate``.
from tracealign_jax.provenance.calibrate import Threshold, calibrate

# Imported on first use (PEP 562): ``import tracealign_jax.provenance.commands`` for a host-only command
# must not pull in JAX (veto_table) or tensorstore (token_bci).
_EXPORTS = {
    "bci": ("BCIScorer", "ScoredSpan", "SpanScore"),
    "bound": ("DriftBound", "drift_bound", "set_bound"),
    "shield": ("OffendingSpan", "ShieldVerdict", "Source", "TraceShield", "render_report", "write_jsonl"),
    "token_bci": ("TokenBCIReader", "compute_token_bci", "token_bci_for_pairs", "write_token_bci"),
    "veto_build": ("build_veto_table", "collect_high_bci_spans"),
    "veto_table": ("VetoTable", "compile_veto_table", "load_veto_table", "save_veto_table", "veto_entries", "veto_penalties"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"tracealign_jax.provenance.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'tracealign_jax.provenance' has no attribute {name!r}")


__all__ = [
    "BCIScorer", "DriftBound", "OffendingSpan", "ScoredSpan", "ShieldVerdict", "Source", "SpanScore", "Threshold",
    "TokenBCIReader", "TraceShield", "VetoTable", "build_veto_table", "calibrate", "collect_high_bci_spans",
    "compile_veto_table", "compute_token_bci", "drift_bound", "load_veto_table", "render_report", "save_veto_table",
    "set_bound", "token_bci_for_pairs", "veto_entries", "veto_penalties", "write_jsonl", "write_token_bci",
]
