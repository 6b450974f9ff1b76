"""Provenance: BCI scoring, TraceShield, the drift bound and the precomputed arrays jitted code uses.

Host-side modules (``bci``, ``calibrate``, ``shield``, ``bound``, ``token_bci`` writers, veto-table
building) take a ``tracealign_jax.index.TraceIndex`` object as an argument; none imports the index
package at import time, so jitted code can import ``veto_table`` without pulling host machinery in.
"""

from tracealign_jax.provenance.veto_table import (
    VetoTable,
    compile_veto_table,
    load_veto_table,
    save_veto_table,
    veto_entries,
    veto_penalties,
)

__all__ = [
    "VetoTable",
    "compile_veto_table",
    "load_veto_table",
    "save_veto_table",
    "veto_entries",
    "veto_penalties",
]
