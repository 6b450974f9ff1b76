"""Compile a jitted step for a TPU slice on a machine without one, and report whether it fits.

``check_step(spec, devices, chip)`` lowers ``spec.jitted`` with abstract arguments
(``jax.ShapeDtypeStruct``s carrying ``NamedSharding``s on a mesh over the slice's devices), compiles
it with libtpu's compiler for exactly that slice, and returns a ``StepReport``: per-device memory
against the chip's HBM, matmul FLOPs, HBM bytes and collectives per step (``hlo_report``), the
analytic model FLOPs with the step time they imply at a target MFU, and a roofline: the step takes at
least max(FLOPs / peak, HBM bytes / HBM bandwidth, interconnect bytes / ICI bandwidth) per chip
(``hardware.CHIPS`` says where each figure comes from), and the largest term names the bound.
Beside the measured collectives: what FSDP should cost (weights all-gathered once per pass,
gradients reduce-scattered once). Nothing is allocated: no weights exist.

Model FLOPs come from ``tracealign_jax.model.flops``, the formula the trainer's logged MFU uses.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any, Callable, Sequence

import jax

from tracealign_jax.aot import hlo_report
from tracealign_jax.aot.hardware import ChipSpec

DEFAULT_HEADROOM = 0.10
"""Fraction of HBM kept free: runtime allocations outside the step (input prefetch, checkpoint
staging, libtpu's own reservations) and fragmentation. A step using more than 90% does not "fit"."""

TARGET_MFU = 0.40


class ShardingMismatch(RuntimeError):
    """The compiled step placed a parameter differently from what the config's rule table declares."""


@dataclasses.dataclass
class StepSpec:
    """One step to compile. args: ShapeDtypeStructs (with shardings) in call order.

    tokens: tokens the step processes (global, per call); model_flops: analytic FLOPs of the call
    (global). declared: optional pytree of NamedShardings that ``select(first argument)`` (e.g. the
    parameters inside a train state) must be compiled with: the shardings the config declares.
    """

    name: str
    jitted: Any
    args: tuple
    tokens: int
    model_flops: float
    declared: Any = None
    select: Callable[[Any], Any] = lambda tree: tree
    frozen: Callable[[Any], Any] | None = None  # first argument -> frozen weights (a LoRA base): gathered, no gradient
    notes: str = ""
    weight_passes: int = 0  # times the step needs every weight whole (forward, backward, each decode step)
    reduces_grads: bool = False  # the step reduce-scatters one gradient per FSDP-sharded weight
    generated_tokens: int = 0  # decode: loop steps (one new token per row each); 0 = not a decode step
    compute_itemsize: int = 0  # bytes per weight element as gathered (the compute dtype); 0 = as stored


def fsdp_expectation(abstract_params: Any, declared: Any, weight_passes: int, reduces_grads: bool,
                     itemsize: int = 0) -> dict[str, float]:  # fmt: skip
    """Interconnect bytes per device FSDP should cost: ``all-gather`` = passes x (n-1)/n x bytes of the
    weights sharded over ``fsdp`` (n its size) in ``itemsize`` bytes per element (0 = as stored),
    ``reduce-scatter`` = (n-1)/n x the bytes of their gradients (the same dtype)."""
    gathered = 0.0
    for leaf, named in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(declared)):
        axes = {a for dim in named.spec if dim is not None for a in ((dim,) if isinstance(dim, str) else dim)}
        if "fsdp" in axes:
            n = named.mesh.shape["fsdp"]
            gathered += (n - 1) / n * leaf.size * (itemsize or leaf.dtype.itemsize)
    return {"all-gather": weight_passes * gathered, "reduce-scatter": gathered if reduces_grads else 0.0}


def expected_collectives(spec: StepSpec) -> dict[str, float]:
    """``fsdp_expectation`` of the step's trained weights plus the all-gathers of its frozen ones."""
    if spec.declared is None:
        return {}
    out = fsdp_expectation(spec.select(spec.args[0]), spec.declared, spec.weight_passes, spec.reduces_grads,
                           spec.compute_itemsize)  # fmt: skip
    if spec.frozen is not None:
        frozen = spec.frozen(spec.args[0])
        base = fsdp_expectation(frozen, jax.tree.map(lambda x: x.sharding, frozen), spec.weight_passes, False,
                                spec.compute_itemsize)  # fmt: skip
        out["all-gather"] += base["all-gather"]
    return out


@dataclasses.dataclass(frozen=True)
class StepReport:
    """Measured facts of one compiled step on one slice (bytes and FLOPs per device unless global)."""

    name: str
    topology: str
    chip: str
    num_devices: int
    hbm_per_device: int
    headroom: float
    compile_seconds: float
    memory: hlo_report.MemoryReport
    costs: hlo_report.HloCosts
    xla_flops: float
    tokens: int
    model_flops: float
    buffers: tuple[hlo_report.Buffer, ...]
    peak_flops_per_device: float
    notes: str = ""
    compiler_refused: bool = False
    hbm_bandwidth_per_device: float = 0.0
    ici_bandwidth_per_device: float | None = None
    chip_source: str = ""
    expected_collectives: dict[str, float] = dataclasses.field(default_factory=dict)
    generated_tokens: int = 0

    @property
    def budget_bytes(self) -> float:
        return self.hbm_per_device * (1.0 - self.headroom)

    @property
    def fits(self) -> bool:
        return not self.compiler_refused and self.memory.used_bytes <= self.budget_bytes

    @property
    def step_seconds_at_target_mfu(self) -> float:
        return self.model_flops / (self.num_devices * self.peak_flops_per_device * TARGET_MFU)

    @property
    def roofline_terms(self) -> dict[str, float]:
        """Seconds per step per chip if each resource alone limited it (compute, HBM, interconnect)."""
        c = self.costs
        terms = {"compute": c.matmul_flops / self.peak_flops_per_device}
        if self.hbm_bandwidth_per_device:
            terms["HBM"] = c.hbm_bytes / self.hbm_bandwidth_per_device
        if self.ici_bandwidth_per_device:
            terms["ICI"] = c.collective_wire_bytes / self.ici_bandwidth_per_device
        return terms

    @property
    def roofline_seconds(self) -> float:
        return max(self.roofline_terms.values())

    @property
    def bound(self) -> str:
        terms = self.roofline_terms
        return max(terms, key=terms.get)

    @property
    def collective_bytes_per_token(self) -> float:
        """Decode: interconnect bytes per device per generated token (per loop step); 0 otherwise."""
        return self.costs.collective_wire_bytes / self.generated_tokens if self.generated_tokens else 0.0

    def summary_lines(self) -> list[str]:
        m, c = self.memory, self.costs
        gb = 1e9
        lines = [
            f"[{self.name}] {self.topology} ({self.num_devices} x {self.chip}), compiled in {self.compile_seconds:.1f} s",
            f"  HBM per device: {m.used_bytes / gb:.2f} GB used of {self.hbm_per_device / gb:.1f} GB "
            f"({100 * m.used_bytes / self.hbm_per_device:.1f}%; budget {self.budget_bytes / gb:.1f} GB "
            f"with {100 * self.headroom:.0f}% headroom) -> {'FITS' if self.fits else 'DOES NOT FIT'}",
            f"    arguments {m.argument_bytes / gb:.2f} GB, outputs {m.output_bytes / gb:.2f} GB "
            f"(aliased {m.alias_bytes / gb:.2f} GB), temporaries {m.temp_bytes / gb:.2f} GB, "
            f"code {m.generated_code_bytes / 1e6:.1f} MB, peak {m.peak_bytes / gb:.2f} GB",
            f"  tokens/step {self.tokens:,}; model FLOPs/step {self.model_flops:.3e} "
            f"({self.model_flops / max(self.tokens, 1):.3e}/token); step time at {TARGET_MFU:.0%} MFU "
            f"{self.step_seconds_at_target_mfu * 1e3:.1f} ms",
            f"  compiled matmul FLOPs/step {c.matmul_flops * self.num_devices:.3e} "
            f"({c.matmul_flops:.3e}/device; XLA cost analysis, loop bodies once: {self.xla_flops:.3e}/device)",
            f"  collectives/step per device: {c.collective_count} ops, {hlo_report.human_bytes(c.collective_bytes)}",
        ]
        hb = hlo_report.human_bytes
        for kind, stats in c.collectives.items():
            if stats.count:
                expected = self.expected_collectives.get(kind)
                beside = f"; FSDP expects {hb(expected)} sent" if expected is not None else ""
                lines.append(f"    {kind:<19} {stats.count:>6} x  {hb(stats.bytes)} results, {hb(stats.wire_bytes)} sent{beside}")
        if self.generated_tokens:
            lines.append(f"  interconnect bytes per generated token per chip: {hb(self.collective_bytes_per_token)} "
                         f"({self.generated_tokens} decode steps)")
        lines.append("  largest collective sources (sent bytes per chip per step, emitting op):")
        lines += [f"    {kind:<19} {st.count:>6} x  {hb(st.wire_bytes):>11}  {op}" for kind, op, st in c.top_sources()]
        ici = f"{self.ici_bandwidth_per_device / 1e9:.0f} GB/s" if self.ici_bandwidth_per_device else "unknown"
        terms = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.roofline_terms.items())
        lines += [
            f"  roofline per chip: {c.matmul_flops:.3e} FLOP / {self.peak_flops_per_device / 1e12:.0f} TFLOP/s, "
            f"{hb(c.hbm_bytes)} HBM / {self.hbm_bandwidth_per_device / 1e9:.0f} GB/s, "
            f"{hb(c.collective_wire_bytes)} ICI / {ici} ({self.chip_source})",
            f"    {terms} -> {self.roofline_seconds * 1e3:.2f} ms, {self.bound}-bound",
        ]
        if c.unknown_trip_loops:
            lines.append(f"  note: {c.unknown_trip_loops} while loop(s) with unknown trip count counted once")
        if self.notes:
            lines.append(f"  note: {self.notes}")
        if not self.fits:
            lines.append("  largest buffers per device:")
            lines += [f"    {line}" for line in hlo_report.describe_buffers(self.buffers)]
        return lines


def compile_with_dump(jitted: Any, args: Sequence[Any], dump_dir: str) -> tuple[Any, float, str]:
    """Lowers and compiles ``jitted(*args)``; XLA writes its buffer assignment into ``dump_dir``.

    Returns (compiled or None, seconds, compiler error). The TPU compiler itself refuses a program
    whose buffers exceed HBM (RESOURCE_EXHAUSTED); that is a measured "does not fit", not a crash.
    """
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump_dir})
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        return None, time.perf_counter() - start, str(err).strip()
    return compiled, time.perf_counter() - start, ""


def check_step(
    spec: StepSpec,
    *,
    topology: str,
    chip: ChipSpec,
    num_devices: int,
    devices_per_chip: int = 1,
    headroom: float = DEFAULT_HEADROOM,
) -> tuple[StepReport, Any]:
    """Compiles ``spec`` and measures it. Returns (report, the jax.stages.Compiled or None if the
    compiler ran out of HBM; the report then comes from XLA's buffer-assignment dump)."""
    with tempfile.TemporaryDirectory(prefix="tracealign_aot_") as dump_dir:
        compiled, seconds, error = compile_with_dump(spec.jitted, spec.args, dump_dir)
        buffers = tuple(hlo_report.largest_buffers(dump_dir))
        if compiled is None:
            memory = hlo_report.dump_memory_report(dump_dir)
            hlo_text = hlo_report.dump_hlo_text(dump_dir)
            if memory is None or hlo_text is None:
                raise RuntimeError(f"[{spec.name}] compile failed and XLA left no buffer assignment: {error}")
    if compiled is not None:
        memory = hlo_report.memory_report(compiled)
        hlo_text = compiled.as_text()
        cost = compiled.cost_analysis() or {}
        if isinstance(cost, (list, tuple)):  # older jax returned one dict per module
            cost = cost[0] if cost else {}
    else:
        cost = {}
    notes = "; ".join(n for n in (spec.notes, f"compiler: {error}" if error else "") if n)
    report = StepReport(
        name=spec.name,
        topology=topology,
        chip=chip.name,
        num_devices=num_devices,
        hbm_per_device=chip.hbm_bytes // devices_per_chip,
        headroom=headroom,
        compile_seconds=seconds,
        memory=memory,
        costs=hlo_report.hlo_costs(hlo_text),
        xla_flops=float(cost.get("flops", 0.0)),
        tokens=spec.tokens,
        model_flops=spec.model_flops,
        buffers=buffers,
        peak_flops_per_device=chip.peak_bf16_flops / devices_per_chip,
        notes=notes,
        compiler_refused=compiled is None,
        hbm_bandwidth_per_device=chip.hbm_bandwidth / devices_per_chip,
        ici_bandwidth_per_device=chip.ici_bandwidth / devices_per_chip if chip.ici_bandwidth else None,
        chip_source=chip.source,
        expected_collectives=expected_collectives(spec),
        generated_tokens=spec.generated_tokens,
    )
    return report, compiled


def compiled_input_shardings(compiled: Any, abstract_args: Any) -> Any:
    """``compiled.input_shardings``, also where jax 0.10 does not count the constants a Pallas kernel
    (splash attention's mask tables) hoists into leading arguments and raises "Too many leaves for
    PyTreeDef". Then the constants are the executable's first ``k`` inputs, ``k`` = (highest kept input
    + 1) - argument leaves (the last argument, a batch field, is always used); arguments XLA dropped get
    None, as jax does. The result is checked leaf by leaf against ``abstract_args``' shapes."""
    try:
        return compiled.input_shardings
    except ValueError as err:
        if "Too many leaves" not in str(err):
            raise
    ex, n = compiled._executable, compiled.in_tree.num_leaves
    kept = sorted(ex._kept_var_idx)
    k = kept[-1] + 1 - n
    by_input = dict(zip(kept, ex._in_shardings))
    avals = dict(zip(kept, ex.in_avals))
    leaves = jax.tree.leaves(abstract_args)
    for i, leaf in enumerate(leaves):
        if k + i in avals and tuple(avals[k + i].shape) != tuple(leaf.shape):
            raise ValueError(f"compiled inputs do not line up with the arguments at leaf {i}: "
                             f"{avals[k + i].shape} vs {leaf.shape}")  # fmt: skip
    return jax.tree_util.tree_unflatten(compiled.in_tree, [by_input.get(k + i) for i in range(n)])


def sharding_mismatches(declared: Any, actual: Any, abstract: Any) -> list[str]:
    """Paths where the compiled input sharding differs from the declared one ([] when all match).

    ``abstract`` supplies each leaf's rank, so P('fsdp', None) and P('fsdp') compare equal.
    """
    flat_declared = jax.tree_util.tree_flatten_with_path(declared)[0]
    flat_actual = jax.tree.leaves(actual)
    flat_abstract = jax.tree.leaves(abstract)
    if not (len(flat_declared) == len(flat_actual) == len(flat_abstract)):
        return [f"leaf counts differ: declared {len(flat_declared)}, compiled {len(flat_actual)}"]
    bad = []
    for (path, want), got, leaf in zip(flat_declared, flat_actual, flat_abstract):
        if not got.is_equivalent_to(want, len(leaf.shape)):
            bad.append(f"{jax.tree_util.keystr(path)}: declared {want.spec}, compiled {got.spec}")
    return bad


def run_checks(
    specs: Sequence[StepSpec],
    *,
    topology: str,
    chip: ChipSpec,
    num_devices: int,
    devices_per_chip: int = 1,
    headroom: float = DEFAULT_HEADROOM,
    on_report: Callable[[StepReport], None] | None = None,
) -> list[StepReport]:
    """``check_step`` over several specs, verifying declared shardings where a spec gives them."""
    reports = []
    for spec in specs:
        report, compiled = check_step(
            spec, topology=topology, chip=chip, num_devices=num_devices,
            devices_per_chip=devices_per_chip, headroom=headroom,
        )
        if spec.declared is not None and compiled is not None:
            compiled_first = compiled_input_shardings(compiled, spec.args)[0][0]
            bad = sharding_mismatches(spec.declared, spec.select(compiled_first), spec.select(spec.args[0]))
            if bad:
                raise ShardingMismatch(f"[{spec.name}] compiled shardings differ from the config's: " + "; ".join(bad[:5]))
        reports.append(report)
        if on_report is not None:
            on_report(report)
    return reports
