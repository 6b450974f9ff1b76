"""Where a compiled step's time goes: measured per-op time, attributed to the parts of the model.

The model, the log-prob head, the losses and the optimizer name their parts with ``jax.named_scope``
(``PARTS``). XLA keeps each scope in the ``op_name`` metadata of every op it produced, forward and
backward alike (``transpose(jvp(attention))`` is attention's backward), and fusions keep the op_name
of their root. ``profile_call`` runs a compiled function under ``jax.profiler``, sums the trace's
per-op durations (events whose ``hlo_op`` belongs to that executable's HLO module) and reports them
per (model, part, direction):
  model      ``reference`` for ops under the in-step reference forward, else ``policy``
  part       the innermost scope of ``PARTS`` in the op_name; ``other`` when none (the residual adds,
             casts); ops without metadata (XLA's own, e.g. the reduce-windows of a tree reduction)
             take the part of their first attributed operand
  direction  ``backward`` when the op_name passes through a ``transpose(...)``, else ``forward``

Times are op time in milliseconds per call: the sum of the ops' durations. A backend that runs ops
concurrently (XLA:CPU runs independent thunks on its thread pool) can sum to more than the wall time,
so read the shares; the wall time of the profiled calls is reported beside them. Profiling itself
slows the calls down.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any, Callable

import jax

from tracealign_jax.aot.hlo_report import op_names, parse_computations

PARTS = ("embed", "norm", "attention_proj", "rope", "attention", "mlp", "layers", "logprobs", "veto", "loss",
         "optimizer")  # fmt: skip
REFERENCE = "reference"
_SCOPES = frozenset(PARTS + (REFERENCE,))
_MODULE_RE = re.compile(r"^HloModule\s+([\w.\-]+)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Site:
    """Which model, part and direction an op belongs to."""

    model: str
    part: str
    direction: str


def site_of(op_name: str) -> Site:
    """The ``Site`` named by one op_name (``jit(step)/transpose(jvp(reference))/attention/exp`` ...)."""
    names = [n for n in re.findall(r"[A-Za-z_]+", op_name) if n in _SCOPES]
    parts = [n for n in names if n != REFERENCE]
    return Site(REFERENCE if REFERENCE in names else "policy", parts[-1] if parts else "other",
                "backward" if "transpose(" in op_name else "forward")  # fmt: skip


def attribute(hlo_text: str) -> dict[str, Site]:
    """HLO instruction name -> its ``Site``, for every instruction of an optimized HLO module's text."""
    named = op_names(hlo_text)
    operands = {i.name: re.findall(r"%([\w.\-]+)", i.rest.split("metadata=")[0].split("calls=")[0])
                for instrs in parse_computations(hlo_text)[0].values() for i in instrs}  # fmt: skip
    sites: dict[str, Site] = {}

    def resolve(name: str, depth: int = 0) -> Site:
        if name in sites:
            return sites[name]
        if name in named:
            site = site_of(named[name])
        else:  # no metadata: inherit from the first operand that has a site (bounded walk up the graph)
            found = (resolve(o, depth + 1) for o in operands.get(name, ()) if depth < 8)
            site = next((s for s in found if s.part != "other"), Site("policy", "other", "forward"))
        sites[name] = site
        return site

    for name in operands:
        resolve(name)
    return sites


def trace_op_times(trace_dir: str, module: str) -> dict[str, float]:
    """Summed duration in microseconds of every op of HLO module ``module`` in a ``jax.profiler`` trace."""
    files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: did the profiler run?")
    totals: collections.Counter[str] = collections.Counter()
    for path in files:
        with gzip.open(path, "rt") as f:
            for event in json.load(f).get("traceEvents", []):
                args = event.get("args") or {}
                if event.get("ph") == "X" and "hlo_op" in args and args.get("hlo_module", module) == module:
                    totals[args["hlo_op"]] += float(event.get("dur", 0.0))
    return dict(totals)


@dataclasses.dataclass(frozen=True)
class Profile:
    """Op time per site (ms per call), the profiled calls' wall time (ms per call) and their count."""

    ms_per_call: dict[Site, float]
    wall_ms_per_call: float
    calls: int

    @property
    def total_ms(self) -> float:
        return sum(self.ms_per_call.values())

    def by(self, field: str) -> dict[str, float]:
        """ms per call summed over one of ``Site``'s fields (model, part or direction)."""
        out: collections.Counter[str] = collections.Counter()
        for site, ms in self.ms_per_call.items():
            out[getattr(site, field)] += ms
        return dict(out)


def profile_call(compiled: Any, call: Callable[[], Any], calls: int = 3) -> Profile:
    """Profile ``calls`` runs of ``call()`` (which runs the jax ``compiled`` executable and blocks on its
    result). ``compiled``: the ``jax.stages.Compiled`` whose ops are attributed (``fn.lower(...).compile()``)."""
    hlo = compiled.as_text()
    module = _MODULE_RE.search(hlo)
    if module is None:
        raise ValueError("not an HLO module's text: no 'HloModule' line")
    sites = attribute(hlo)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        t0 = time.perf_counter()
        try:
            for _ in range(calls):
                call()
        finally:
            wall = time.perf_counter() - t0
            jax.profiler.stop_trace()
        times = trace_op_times(trace_dir, module.group(1))
    if not times:
        raise RuntimeError(f"the trace holds no op of module {module.group(1)}: was it the executable that ran?")
    per_site: collections.Counter[Site] = collections.Counter()
    for op, us in times.items():
        per_site[sites.get(op, Site("policy", "other", "forward"))] += us / 1e3 / calls
    return Profile(dict(per_site), wall * 1e3 / calls, calls)


def markdown_table(profiles: dict[str, Profile]) -> str:
    """One row per (model, part), one column pair (ms, share) per profile, forward + backward in a cell."""
    keys = sorted({(s.model, s.part) for p in profiles.values() for s in p.ms_per_call},
                  key=lambda k: (k[0] != "policy", PARTS.index(k[1]) if k[1] in PARTS else len(PARTS)))  # fmt: skip
    head = "| model | part | " + " | ".join(f"{name}: fwd + bwd ms (share)" for name in profiles) + " |"
    lines = [head, "|---|---|" + "---|" * len(profiles)]
    for model, part in keys:
        cells = []
        for p in profiles.values():
            fwd = p.ms_per_call.get(Site(model, part, "forward"), 0.0)
            bwd = p.ms_per_call.get(Site(model, part, "backward"), 0.0)
            cells.append(f"{fwd:.1f} + {bwd:.1f} ({100 * (fwd + bwd) / p.total_ms:.1f}%)")
        lines.append(f"| {model} | {part} | " + " | ".join(cells) + " |")
    lines.append("| all | op time | " + " | ".join(f"{p.total_ms:.1f} (wall {p.wall_ms_per_call:.1f})" for p in profiles.values()) + " |")
    return "\n".join(lines)
