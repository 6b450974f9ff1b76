"""What a compiled step costs per device: memory, matmul FLOPs and collectives, read from XLA's output.

Three sources, all per device (the HLO after SPMD partitioning is one device's program):
- ``memory_report(compiled)``: ``compiled.memory_analysis()`` (argument, output, alias, temporary,
  generated-code bytes, and the buffer assignment's peak).
- ``hlo_costs(hlo_text)``: parses ``compiled.as_text()``. Collectives (all-gather, reduce-scatter,
  all-reduce, all-to-all, collective-permute: count and bytes of their result shapes) and
  dot/convolution FLOPs, each weighted by how often its computation runs: a collective inside the
  ``while`` body of a scan over 32 layers counts 32 times. XLA's own ``cost_analysis()`` counts a
  loop body once, which under-reports a layer-scanned model by the layer count.
- ``largest_buffers(dump_dir)``: the biggest allocations from XLA's buffer-assignment dump, named by
  the JAX op (or argument path) that produced them, for the "does not fit" message.

Bytes are bytes of the on-device array (elements x dtype size), not counting tile padding.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

DTYPE_BYTES: dict[str, float] = {
    "pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER_RE = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_CHANNEL_RE = re.compile(r"\bchannel_id=(\d+)")
_CALLEE_RE = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one compiled executable (from ``compiled.memory_analysis()``).

    used_bytes: what the executable needs resident on the device: the buffer assignment's peak
    (arguments + outputs + temporaries live at once, donated inputs aliased) plus generated code.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    peak_bytes: int

    @property
    def used_bytes(self) -> int:
        live = self.peak_bytes or (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes)
        return live + self.generated_code_bytes


def memory_report(compiled: Any) -> MemoryReport:
    """MemoryReport of a ``jax.stages.Compiled`` (raises if the backend gives no memory analysis)."""
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend returned no memory analysis for the compiled step")
    return MemoryReport(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        generated_code_bytes=int(stats.generated_code_size_in_bytes),
        peak_bytes=int(getattr(stats, "peak_memory_in_bytes", 0) or 0),
    )


def shape_bytes(type_str: str) -> float:
    """Bytes of every array in an HLO type string (a tuple sums its elements)."""
    total = 0.0
    for dtype, dims in _ARRAY_RE.findall(type_str):
        if dtype not in DTYPE_BYTES:
            continue
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(type_str: str) -> list[int]:
    """Dimensions of the first array in an HLO type string."""
    match = _ARRAY_RE.search(type_str)
    if not match:
        return []
    return [int(d) for d in match.group(2).split(",") if d]


def _top_level_elements(type_str: str) -> list[str]:
    """Top-level elements of a tuple type ``(a, (b, c), d)``; a non-tuple is its own single element."""
    text = re.sub(r"/\*.*?\*/", "", type_str.strip())
    if not text.startswith("("):
        return [text]
    depth, start, out = 0, 1, []
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                out.append(text[start:i])
        elif ch == "," and depth == 1:
            out.append(text[start:i])
            start = i + 1
    return [e.strip() for e in out if e.strip()]


@dataclasses.dataclass
class Instr:
    name: str
    type_str: str
    op: str
    rest: str


@dataclasses.dataclass(frozen=True)
class CollectiveStats:
    """One collective kind per device per step: executions, bytes of their results, and the bytes
    each device sends over the interconnect (``wire_bytes``, ring algorithms over a group of n:
    all-gather / all-to-all (n-1)/n x result, reduce-scatter (n-1) x result, all-reduce
    2 (n-1)/n x result, collective-permute the result)."""

    count: int
    bytes: float
    wire_bytes: float = 0.0


@dataclasses.dataclass(frozen=True)
class HloCosts:
    """Per-device costs of one step from the optimized HLO, loop bodies weighted by trip count.

    matmul_flops: 2 x multiply-adds of every dot/convolution (elementwise work not included).
    unknown_trip_loops: while loops whose trip count could not be read (counted once).
    hbm_bytes: bytes read and written by the top-level instructions (fusions, dots, copies,
      collectives: operands + results; what a fusion keeps on chip is not counted; an operand that
      is only sliced counts the slice, a buffer updated in place the update), XLA's "bytes
      accessed" with loop bodies weighted by their trip count.
    sources: (kind, emitting op) -> CollectiveStats, the op being the JAX op_name metadata of the
      collective (its source location's function path, e.g. ``jit(step)/.../dot_general``).
    """

    matmul_flops: float
    collectives: dict[str, CollectiveStats]
    unknown_trip_loops: int
    hbm_bytes: float = 0.0
    sources: dict[tuple[str, str], CollectiveStats] = dataclasses.field(default_factory=dict)

    def top_sources(self, n: int = 8) -> list[tuple[str, str, CollectiveStats]]:
        """The ``n`` (kind, op, stats) moving the most bytes."""
        ranked = sorted(self.sources.items(), key=lambda kv: -kv[1].bytes)[:n]
        return [(kind, op, stats) for (kind, op), stats in ranked]

    @property
    def collective_bytes(self) -> float:
        return sum(c.bytes for c in self.collectives.values())

    @property
    def collective_wire_bytes(self) -> float:
        return sum(c.wire_bytes for c in self.collectives.values())

    @property
    def collective_count(self) -> int:
        return sum(c.count for c in self.collectives.values())


def parse_computations(hlo_text: str) -> tuple[dict[str, list[Instr]], str]:
    """(computation name -> instructions, entry computation name) of an HLO module's text."""
    comps: dict[str, list[Instr]] = {}
    entry = ""
    current: list[Instr] | None = None
    for line in hlo_text.splitlines():
        if not line or line.startswith(("HloModule", "//")):
            continue
        if not line[0].isspace() and line.rstrip().endswith("{"):
            match = _HEADER_RE.match(line)
            if match:
                current = comps.setdefault(match["name"], [])
                if line.startswith("ENTRY"):
                    entry = match["name"]
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        match = _INSTR_RE.match(line)
        if match:
            current.append(Instr(match["name"], match["type"], match["op"], match["rest"]))
    if not entry:
        raise ValueError("HLO text has no ENTRY computation")
    return comps, entry


def _trip_count(instr: Instr, comps: dict[str, list[Instr]]) -> int | None:
    """Iterations of a ``while``: XLA's known_trip_count, else ``i < N`` read off the condition."""
    known = _TRIP_RE.search(instr.rest)
    if known:
        return int(known.group(1))
    cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.rest)
    if not cond or cond.group(1) not in comps:
        return None
    body = comps[cond.group(1)]
    constants = {i.name: i for i in body if i.op == "constant"}
    for i in body:
        if i.op != "compare":
            continue
        operands = re.findall(r"%([\w.\-]+)", i.rest.split(")")[0])
        direction = re.search(r"direction=(\w+)", i.rest)
        if len(operands) != 2 or not direction:
            continue
        lhs, rhs = operands
        if rhs in constants and direction.group(1) in ("LT", "LE"):
            value = re.search(r"constant\((-?\d+)\)", f"constant({constants[rhs].rest}")
            if value:
                return int(value.group(1)) + (direction.group(1) == "LE")
        if lhs in constants and direction.group(1) in ("GT", "GE"):
            value = re.search(r"constant\((-?\d+)\)", f"constant({constants[lhs].rest}")
            if value:
                return int(value.group(1)) + (direction.group(1) == "GE")
    return None


def execution_counts(comps: dict[str, list[Instr]], entry: str) -> tuple[dict[str, float], int]:
    """How many times each computation runs per step (while bodies x trip count), and #unknown loops."""
    edges: dict[str, list[tuple[str, float]]] = defaultdict(list)
    unknown = 0
    for name, instrs in comps.items():
        for instr in instrs:
            if instr.op in ("async-update", "async-done"):
                continue  # they name the computation their async-start already runs: count it once
            trip = _trip_count(instr, comps) if instr.op == "while" else None
            if instr.op == "while" and trip is None:
                unknown += 1
            for role, callee in _CALLEE_RE.findall(instr.rest):
                factor = float(trip or 1) if role == "body" else 1.0
                if role == "condition":
                    factor = float(trip or 0) + 1.0
                edges[name].append((callee, factor))
            branches = _BRANCHES_RE.search(instr.rest)
            if branches:
                for callee in re.findall(r"%?([\w.\-]+)", branches.group(1)):
                    edges[name].append((callee, 1.0))
    # Topological order from the entry (call graphs are acyclic), then push counts down.
    order: list[str] = []
    seen: set[str] = set()

    def visit(node: str) -> None:
        stack = [(node, iter(edges.get(node, ())))]
        seen.add(node)
        while stack:
            current, children = stack[-1]
            for child, _ in children:
                if child not in seen and child in comps:
                    seen.add(child)
                    stack.append((child, iter(edges.get(child, ()))))
                    break
            else:
                order.append(current)
                stack.pop()

    visit(entry)
    counts: dict[str, float] = defaultdict(float)
    counts[entry] = 1.0
    for name in reversed(order):
        for child, factor in edges.get(name, ()):
            counts[child] += counts[name] * factor
    return dict(counts), unknown


def _window_pairs(out: int, size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int, in_size: int) -> int:
    """Pairs (output position, window position) of one spatial dimension that hit a real input
    element: not padding and not a hole of the lhs dilation (the TPU compiler writes batched and
    grouped matmuls as dilated, padded convolutions; most window positions of those hit zeros)."""
    dilated = (in_size - 1) * lhs_dil + 1
    total = 0
    o = np.arange(out, dtype=np.int64)
    for w in range(size):
        pos = o * stride + w * rhs_dil - pad_lo
        total += int(np.count_nonzero((pos >= 0) & (pos < dilated) & (pos % lhs_dil == 0)))
    return total


def _window_attr(window: str, key: str, n: int, default: int) -> list[int]:
    match = re.search(rf"\b{key}=([0-9x]+)", window)
    return [int(v) for v in match.group(1).split("x")] if match else [default] * n


def _matmul_flops(instr: Instr, shapes: dict[str, str]) -> float:
    """2 x multiply-adds of a dot or convolution (XLA's HloCostAnalysis counting, per device)."""
    out_dims = _dims(instr.type_str)
    operands = re.findall(r"%([\w.\-]+)", instr.rest.split("),")[0])
    if len(operands) < 2:
        return 0.0
    lhs_dims = _dims(shapes.get(operands[0], ""))
    if instr.op == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.rest)
        if not contracting or not lhs_dims:
            return 0.0
        k = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(",") if d)
        return 2.0 * math.prod(out_dims) * k
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.rest)
    rhs_dims = _dims(shapes.get(operands[1], ""))
    if not labels or not rhs_dims or not lhs_dims:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    if not (len(lhs_l) == len(lhs_dims) and len(rhs_l) == len(rhs_dims) and len(out_l) == len(out_dims)):
        return 0.0
    spatial = sorted(c for c in out_l if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", instr.rest)
    window = window.group(1) if window else ""
    n = len(spatial)
    sizes = [rhs_dims[rhs_l.index(c)] for c in spatial]
    strides = _window_attr(window, "stride", n, 1)
    lhs_dil = _window_attr(window, "lhs_dilate", n, 1)
    rhs_dil = _window_attr(window, "rhs_dilate", n, 1)
    pads = re.search(r"\bpad=([0-9_x\-]+)", window)
    pad_lo = [int(p.split("_")[0]) for p in pads.group(1).split("x")] if pads else [0] * n
    macs = float(out_dims[out_l.index("b")] * out_dims[out_l.index("f")] * rhs_dims[rhs_l.index("i")])
    for j, c in enumerate(spatial):
        macs *= _window_pairs(out_dims[out_l.index(c)], sizes[j], strides[j], pad_lo[j],
                              lhs_dil[j], rhs_dil[j], lhs_dims[lhs_l.index(c)])
    return 2.0 * macs


def _collective_kind(op: str) -> str | None:
    for kind in COLLECTIVES:
        if op == kind or op == f"{kind}-start":
            return kind
    return None


_IOTA_GROUPS_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]")
_LIST_GROUPS_RE = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_MESH_GROUPS_RE = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")


def _group_size(instr: Instr) -> int:
    """Devices in one replica group of a collective: mesh form ``mesh['a'=8,'b'=1] {'a'}``, iota form
    ``[G,N]<=[...]`` or explicit ``{{0,1,..},..}``."""
    mesh = _MESH_GROUPS_RE.search(instr.rest)
    if mesh:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", mesh.group(1))}
        return math.prod(sizes.get(a, 1) for a in re.findall(r"'([^']+)'", mesh.group(2)))
    iota = _IOTA_GROUPS_RE.search(instr.rest)
    if iota:
        return int(iota.group(2))
    listed = _LIST_GROUPS_RE.search(instr.rest)
    if listed and listed.group(1):
        return len(listed.group(1).split(","))
    return 2  # no groups printed: every device (a conservative (n-1)/n ~ 1/2 for the ring factors)


def wire_bytes(kind: str, result_bytes: float, group: int) -> float:
    """Bytes one device sends for a collective of ``result_bytes`` over a group of ``group`` (rings)."""
    n = max(group, 1)
    factor = {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n, "reduce-scatter": float(n - 1),
              "all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}[kind]  # fmt: skip
    return result_bytes * factor


def _collective_result_bytes(instr: Instr, kind: str) -> float:
    """Bytes the collective produces. Async ``-start`` ops return (operands, results[, contexts])."""
    if not instr.op.endswith("-start"):
        return shape_bytes(instr.type_str)
    elements = [e for e in _top_level_elements(instr.type_str) if _ARRAY_RE.search(e)]
    elements = [e for e in elements if not re.fullmatch(r"[us]32\[\]\S*", e)]
    if kind == "all-reduce" or len(elements) < 2:
        return sum(shape_bytes(e) for e in elements)
    return shape_bytes(elements[1])


# Instructions that move no HBM bytes of their own (aliases, bookkeeping, control flow whose bodies count).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "iota", "opt-barrier", "async-done", "async-update",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "send-done",
               "recv-done", "custom-call-done"}  # fmt: skip


def _fused_computations(comps: dict[str, list[Instr]]) -> set[str]:
    """Computations called by fusions (and reducers): their instructions run on chip, not HBM."""
    inner: set[str] = set()
    for instrs in comps.values():
        for instr in instrs:
            if instr.op == "fusion" or "to_apply=" in instr.rest:
                inner.update(c for role, c in _CALLEE_RE.findall(instr.rest) if role in ("calls", "to_apply"))
    return inner


def _operands(instr: Instr) -> list[str]:
    """Names of an instruction's operands, in order."""
    return re.findall(r"%([\w.\-]+)", instr.rest.split("), ")[0])


def _callee(instr: Instr) -> str | None:
    return next((c for role, c in _CALLEE_RE.findall(instr.rest) if role == "calls"), None)


def _in_place_update(instrs: list[Instr]) -> Instr | None:
    """The computation's root when it is a dynamic-update-slice of its own parameter (written in place)."""
    root = instrs[-1] if instrs else None  # HLO text prints the ROOT last
    if root is None or root.op != "dynamic-update-slice":
        return None
    params = {i.name for i in instrs if i.op == "parameter"}
    return root if _operands(root)[0] in params else None


def _param_read_bytes(comps: dict[str, list[Instr]], comp: str, index: int) -> float | None:
    """Bytes a fused computation reads of its parameter ``index`` when it only slices it (a scanned
    layer's weights out of the [L, ...] stack, a KV-cache row) or updates it in place; None = all of it."""
    instrs = comps.get(comp, [])
    param = next((i for i in instrs if i.op == "parameter" and i.rest.startswith(f"{index})")), None)
    if param is None:
        return None
    total = 0.0
    for user in instrs:
        ops = _operands(user)
        if param.name not in ops:
            continue
        if ops.count(param.name) > 1:
            return None
        at = ops.index(param.name)
        if user.op in ("dynamic-slice", "slice", "gather") and at == 0:
            total += shape_bytes(user.type_str)
        elif user.op == "dynamic-update-slice" and at == 0 and user is _in_place_update(instrs):
            continue  # the rest of the buffer is neither read nor written
        elif user.op == "fusion" and (callee := _callee(user)) is not None:
            inner = _param_read_bytes(comps, callee, at)
            if inner is None:
                return None
            total += inner
        else:
            return None
    return total


def _traffic_bytes(instr: Instr, shapes: dict[str, str], comps: dict[str, list[Instr]]) -> float:
    """HBM bytes one top-level instruction reads and writes: its operands and result, except that a
    sliced operand counts only the slice (XLA's own utilization rule: a layer scan reads one layer of
    the stacked weights per iteration) and a buffer updated in place counts only the update."""
    ops = _operands(instr)
    reads = [shape_bytes(shapes[n]) if n in shapes else 0.0 for n in ops]
    written = shape_bytes(instr.type_str)
    if instr.op in ("dynamic-slice", "slice") and reads:
        reads[0] = written
    elif instr.op == "dynamic-update-slice" and len(reads) > 1:
        reads[0], written = 0.0, reads[1]
    elif instr.op == "fusion" and (callee := _callee(instr)) in comps:
        for k in range(len(reads)):
            sliced = _param_read_bytes(comps, callee, k)
            if sliced is not None:
                reads[k] = min(reads[k], sliced)
        root = _in_place_update(comps[callee])
        if root is not None:
            inner = {i.name: i.type_str for i in comps[callee]}
            written = shape_bytes(inner.get(_operands(root)[1], instr.type_str))
    return written + sum(reads)


def short_op_name(op_name: str) -> str:
    """``jit(train_step)/jit(main)/transpose(jvp(Transformer))/.../dot_general`` -> the last four
    path components without the outer jit wrappers: enough to name the model code that emitted it."""
    parts = [p for p in op_name.split("/") if not p.startswith("jit(")]
    return "/".join(parts[-4:]) if parts else op_name


def hlo_costs(hlo_text: str) -> HloCosts:
    """Per-device matmul FLOPs, HBM bytes and collectives (with their emitting ops) of one execution."""
    comps, entry = parse_computations(hlo_text)
    counts, unknown = execution_counts(comps, entry)
    fused = _fused_computations(comps)
    names = op_names(hlo_text)
    flops = hbm = 0.0
    # One logical collective per channel_id: TPU async collective fusion splits an all-gather into a
    # start, continuation fusions overlapped with other work (some sunk into a windowed-einsum loop
    # nested in the layer loop) and a done, each holding an ``all-gather`` of the full result with the
    # same channel_id. It runs as often as its least-run piece. Counting every piece over-counted a
    # LoRA step's weight gathers 2x (14.8 GiB sent where FSDP expects 7.3; one piece each: 6.4).
    logical: dict[str, tuple[float, Instr]] = {}
    for name, instrs in comps.items():
        runs = counts.get(name, 0.0)
        if not runs:
            continue
        shapes = {i.name: i.type_str for i in instrs}
        for instr in instrs:
            if name not in fused and instr.op not in _NO_TRAFFIC:
                hbm += runs * _traffic_bytes(instr, shapes, comps)
            if instr.op in ("dot", "convolution"):
                flops += runs * _matmul_flops(instr, shapes)
                continue
            if _collective_kind(instr.op):
                channel = _CHANNEL_RE.search(instr.rest)
                key = f"channel {channel.group(1)}" if channel else f"{name}/{instr.name}"
                if key not in logical or runs < logical[key][0]:
                    logical[key] = (runs, instr)
    stats: dict[str, list[float]] = {kind: [0, 0.0, 0.0] for kind in COLLECTIVES}
    sources: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for runs, instr in logical.values():
        kind = _collective_kind(instr.op)
        moved = runs * _collective_result_bytes(instr, kind)
        sent = wire_bytes(kind, moved, _group_size(instr))
        source = sources[(kind, short_op_name(names.get(instr.name, "(no op_name)")))]
        for acc in (stats[kind], source):
            acc[0] += runs
            acc[1] += moved
            acc[2] += sent
    return HloCosts(
        matmul_flops=flops, collectives={k: CollectiveStats(int(v[0]), v[1], v[2]) for k, v in stats.items()},
        unknown_trip_loops=unknown, hbm_bytes=hbm,
        sources={k: CollectiveStats(int(v[0]), v[1], v[2]) for k, v in sources.items()},
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Buffer:
    """One allocation of the buffer assignment: bytes per device and who produced it."""

    bytes: int
    kind: str  # parameter | output | temp
    shape: str
    source: str


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name in its metadata (argument paths for parameters)."""
    out = {}
    for match in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{[^}]*?op_name=\"([^\"]+)\"", hlo_text):
        out[match.group(1)] = match.group(2).replace("\\'", "'")  # HLO escapes quotes in paths
    return out


def _dump_file(dump_dir: str | Path, suffix: str) -> Path | None:
    """The file ``*<suffix>`` of the step's module in an XLA dump (the largest module: jit may also
    dump small helper modules)."""
    found = sorted(Path(dump_dir).glob(f"*{suffix}"))
    return max(found, key=lambda p: p.stat().st_size) if found else None


def _allocations(dump_dir: str | Path) -> tuple[list[dict[str, Any]], Path | None]:
    """Allocations of the buffer-assignment dump: bytes, kind (parameter|output|temp|skip), values."""
    assignment = _dump_file(dump_dir, "after_optimizations-buffer-assignment.txt")
    if assignment is None:
        return [], None
    allocs: list[dict[str, Any]] = []
    for line in assignment.read_text().splitlines():
        head = re.match(r"allocation \d+: size (\d+)(.*)$", line)
        if head:
            info = head.group(2)
            kind = "parameter" if "parameter" in info else "output" if "output" in info else "temp"
            if "thread-local" in info or re.search(r"color [1-9]", info):
                kind = "skip"  # scalars in registers, on-chip VMEM/SMEM: not HBM
            allocs.append({"bytes": int(head.group(1)), "kind": kind, "values": []})
            continue
        value = re.match(r"\s*value: <\d+ ([\w.\-]+)[^>]*> \(size=(\d+)[^)]*\): (.*)$", line)
        if value and allocs:
            allocs[-1]["values"].append((int(value.group(2)), value.group(1), value.group(3)))
    return allocs, assignment


def largest_buffers(dump_dir: str | Path, top: int = 8) -> list[Buffer]:
    """The ``top`` largest HBM allocations in an XLA dump directory (``xla_dump_to``) of one module.

    Reads ``*after_optimizations-buffer-assignment.txt`` (allocation sizes, whether each is a
    parameter, a live-out output or a temporary) and ``*after_optimizations.txt`` (op_name metadata,
    which for parameters is the argument's path). XLA writes both even when compilation then fails
    for lack of memory, which is when they are needed most.
    """
    allocs, assignment = _allocations(dump_dir)
    if assignment is None:
        return []
    prefix = assignment.name[: -len("-buffer-assignment.txt")]
    hlo_path = assignment.parent / f"{prefix}.txt"
    names = op_names(hlo_path.read_text()) if hlo_path.exists() else {}
    buffers = [_to_buffer(a, names) for a in allocs if a["kind"] != "skip"]
    return sorted(buffers, key=lambda b: -b.bytes)[:top]


def dump_memory_report(dump_dir: str | Path) -> MemoryReport | None:
    """Per-device memory from the buffer-assignment dump (for steps the compiler refused as too big).

    Arguments, outputs and temporaries are the summed HBM allocations of each kind; the peak is the
    assignment's total for the default memory space (allocations that are never live together
    share offsets, so it can be below the sum).
    """
    allocs, _ = _allocations(dump_dir)
    if not allocs:
        return None
    total = {k: sum(a["bytes"] for a in allocs if a["kind"] == k) for k in ("parameter", "output", "temp")}
    peak = sum(total.values())
    report = _dump_file(dump_dir, "after_optimizations-memory-usage-report.txt")
    if report is not None:
        match = re.search(r"Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", report.read_text())
        if match:
            peak = int(match.group(1))
    return MemoryReport(total["parameter"], total["output"], 0, total["temp"], 0, peak)


def dump_hlo_text(dump_dir: str | Path) -> str | None:
    """The optimized HLO text of the step's module from an XLA dump."""
    path = _dump_file(dump_dir, "after_optimizations.txt")
    return path.read_text() if path is not None else None


def _to_buffer(alloc: dict[str, Any], names: dict[str, str]) -> Buffer:
    if not alloc["values"]:
        return Buffer(alloc["bytes"], alloc["kind"], "", "")
    size, instr, shape = max(alloc["values"], key=lambda v: v[0])
    shape = re.sub(r"\{[^}]*\}", "", shape)
    return Buffer(alloc["bytes"], alloc["kind"], shape, names.get(instr, instr))


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def describe_buffers(buffers: Iterable[Buffer]) -> list[str]:
    """One line per buffer: size, kind, shape, producing op / argument path."""
    return [f"{human_bytes(b.bytes):>11}  {b.kind:<9} {b.shape:<28} {b.source}" for b in buffers]
