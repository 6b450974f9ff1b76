"""Provenance: BCI scoring, TraceShield, the drift bound and the precomputed arrays jitted code uses.

Host-side modules (``bci``, ``calibrate``, ``shield``, ``bound``, ``token_bci`` writers, ``veto_build``)
take a ``tracealign_jax.index.TraceIndex`` object as an argument; none imports the index package, so
jitted code (training, decoding) can import ``veto_table`` without pulling host machinery in.
"""

from tracealign_jax.provenance.bci import BCIScorer, ScoredSpan, SpanScore
from tracealign_jax.provenance.bound import DriftBound, drift_bound, set_bound
from tracealign_jax.provenance.calibrate import Threshold, calibrate
from tracealign_jax.provenance.shield import OffendingSpan, ShieldVerdict, Source, TraceShield, render_report, write_jsonl
from tracealign_jax.provenance.token_bci import compute_token_bci, token_bci_for_pairs
from tracealign_jax.provenance.veto_build import build_veto_table, collect_high_bci_spans
from tracealign_jax.provenance.veto_table import (
    VetoTable,
    compile_veto_table,
    load_veto_table,
    save_veto_table,
    veto_entries,
    veto_penalties,
)

__all__ = [
    "BCIScorer", "DriftBound", "OffendingSpan", "ScoredSpan", "ShieldVerdict", "Source", "SpanScore", "Threshold",
    "TraceShield", "VetoTable", "build_veto_table", "calibrate", "collect_high_bci_spans",
    "compile_veto_table", "compute_token_bci", "drift_bound", "load_veto_table", "render_report", "save_veto_table",
    "set_bound", "token_bci_for_pairs", "veto_entries", "veto_penalties", "write_jsonl",
]
