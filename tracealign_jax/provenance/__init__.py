"""Provenance: BCI scoring, TraceShield, the drift bound and the per-token BCI arrays (host side).

Modules take a ``tracealign_jax.index.TraceIndex`` object as an argument; none imports the index
package. Names below load their module on first use, so importing one submodule pulls in nothing
else (the veto table itself lives in ``tracealign_jax.veto``).
"""

import importlib
from typing import Any

_HOMES = {
    "BCIScorer": "bci", "ScoredSpan": "bci", "SpanScore": "bci",
    "DriftBound": "bound", "drift_bound": "bound", "set_bound": "bound",
    "Threshold": "calibrate",
    "OffendingSpan": "shield", "ShieldVerdict": "shield", "Source": "shield", "TraceShield": "shield",
    "render_report": "shield", "write_jsonl": "shield",
    "compute_token_bci": "token_bci", "token_bci_for_pairs": "token_bci",
    "build_veto_table": "veto_build", "collect_high_bci_spans": "veto_build",
}  # fmt: skip
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
