"""Compile-check whole configs and publish the results: the README table and a comment in each config.

``check_config(path, ...)`` loads a run config, builds a mesh over the TPU slice it targets
(``mesh.topology`` or an explicit one), builds the train / decode steps exactly as the trainer and
decoder do (``aot.steps``) and compiles each. ``markdown_table(rows)`` renders what was measured;
``write_markdown_table`` replaces the marked block of a markdown file with it, and
``update_config_comments`` writes a marked comment block at the top of each config file.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax

from tracealign_jax.aot import hardware, hlo_report
from tracealign_jax.aot import steps as step_specs
from tracealign_jax.aot.compile_check import TARGET_MFU, StepReport, run_checks
from tracealign_jax.atomic_io import atomic_write_json, atomic_write_text
from tracealign_jax.config import ConfigError, load_config
from tracealign_jax.sharding import build_mesh, resolve_rules

COMMENT_BEGIN = "# >>> compile-check results (regenerate: tracealign compile-check --all --update-configs)"
COMMENT_END = "# <<< compile-check results"


@dataclasses.dataclass(frozen=True)
class Row:
    """One compiled step of one config file; ``measured``: when and with which jax it was compiled (a
    table rebuilt with ``--from-json`` may mix rows of several days)."""

    config: Path
    report: StepReport
    measured: str = ""


def pod_configs(configs_dir: str | Path) -> list[Path]:
    """Config files in ``configs_dir`` that name a TPU slice (``mesh.topology``), sorted by name."""
    out = []
    for path in sorted(Path(configs_dir).glob("*.yaml")):
        if load_config(path).mesh.topology:
            out.append(path)
    return out


def check_config(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    topology: str = "",
    steps: Sequence[str] = ("train", "decode"),
    references: Sequence[str] = ("precomputed", "in_step"),
    headroom: float = 0.10,
    echo: Callable[[str], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Compiles the config's steps for its TPU slice; one Row per compiled step (``on_row`` sees
    each as soon as it is measured: an 8B step can take many minutes to compile on a small host)."""
    path = Path(path)
    cfg = load_config(path, overrides)
    topology = topology or cfg.mesh.topology
    if not topology:
        raise ConfigError(f"{path}: no --topology given and mesh.topology is not set")
    try:
        chip, _ = hardware.parse_topology(topology)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    devices = hardware.tpu_topology(topology)
    per_chip = max(1, len(devices) // hardware.num_chips(topology))
    mesh = build_mesh(cfg.mesh, devices=devices)
    rules = resolve_rules(cfg.mesh.rules)
    if echo:
        echo(f"== {path} on {topology}: mesh {dict(mesh.shape)}, {len(devices)} devices")
    specs = step_specs.build_specs(cfg, mesh, rules, steps=tuple(steps), references=tuple(references))
    when = _provenance()

    def show(report: StepReport) -> None:
        if echo:
            for line in report.summary_lines():
                echo(line)
        if on_row:
            on_row(Row(path, report, when))

    reports = run_checks(
        specs, topology=topology, chip=chip, num_devices=len(devices),
        devices_per_chip=per_chip, headroom=headroom, on_report=show,
    )
    return [Row(path, r, when) for r in reports]


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f}" if n >= 1e8 else f"{n / 1e9:.3f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.3g} ms"


def markdown_table(rows: Sequence[Row]) -> str:
    """The measured table: one line per (config, step)."""
    head = (
        "| config | step | topology (chips) | HBM/chip used / avail (GB) | fits (headroom) | "
        f"model FLOPs/step | compiled matmul FLOPs/step | collective bytes/step/chip | step @{TARGET_MFU:.0%} MFU | "
        "roofline step (bound) | decode ICI bytes/token/chip | compile (s) | compiled |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        r = row.report
        used = r.memory.used_bytes
        lines.append(
            f"| `{row.config.name}` | {r.name} | {r.topology} ({r.num_devices}) | "
            f"{_gb(used)} / {_gb(r.hbm_per_device)} ({100 * used / r.hbm_per_device:.0f}%) | "
            f"{'yes' if r.fits else '**no**'} ({100 * r.headroom:.0f}%) | {r.model_flops:.2e} | "
            f"{r.costs.matmul_flops * r.num_devices:.2e} | {r.costs.collective_bytes / 2**30:.2f} GiB "
            f"({r.costs.collective_count} ops) | {_ms(r.step_seconds_at_target_mfu)} | "
            f"{f'{_ms(r.roofline_seconds)} ({r.bound})' if r.costs.hbm_bytes else 'not measured'} | "
            f"{hlo_report.human_bytes(r.collective_bytes_per_token) if r.generated_tokens else '-'} | {r.compile_seconds:.0f} | {row.measured or '?'} |"
        )
    return "\n".join(lines)


def _provenance() -> str:
    return f"{datetime.date.today().isoformat()}, jax {jax.__version__}"


def write_markdown_table(rows: Sequence[Row], path: str | Path, begin: str, end: str) -> None:
    """Replaces the text between ``begin`` and ``end`` in ``path`` (appends the block if absent)."""
    path = Path(path)
    block = f"{begin}\n_Table written {_provenance()}; each row's compile date in its last column._\n\n{markdown_table(rows)}\n{end}"
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)


def comment_lines(rows: Sequence[Row]) -> list[str]:
    """The per-config comment block (one line per compiled step)."""
    lines = [COMMENT_BEGIN]
    for row in rows:
        r = row.report
        lines.append(
            f"#   {r.name} on {r.topology} (compiled {row.measured or '?'}): HBM {_gb(r.memory.used_bytes)} / {_gb(r.hbm_per_device)} GB per chip "
            f"({'fits' if r.fits else 'DOES NOT FIT'}, {100 * r.headroom:.0f}% headroom), "
            f"{r.model_flops:.2e} model FLOPs/step, {r.costs.collective_bytes / 2**30:.2f} GiB collectives/step/chip, "
            f"compile {r.compile_seconds:.0f} s"
        )
    lines.append(COMMENT_END)
    return lines


def update_config_comments(rows: Sequence[Row]) -> None:
    """Writes (or replaces) the comment block at the top of each config file in ``rows``."""
    by_config: dict[Path, list[Row]] = {}
    for row in rows:
        by_config.setdefault(row.config, []).append(row)
    for path, config_rows in by_config.items():
        text = path.read_text()
        pattern = re.compile(re.escape(COMMENT_BEGIN) + r".*?" + re.escape(COMMENT_END) + r"\n?", re.S)
        text = pattern.sub("", text)
        atomic_write_text(path, "\n".join(comment_lines(config_rows)) + "\n" + text)


def row_to_dict(row: Row) -> dict:
    """Every measured number of one row (JSON-ready); ``row_from_dict`` reads it back."""
    r = row.report
    return {
        "config": str(row.config), "step": r.name, "topology": r.topology, "chip": r.chip,
        "num_devices": r.num_devices, "hbm_per_device": r.hbm_per_device, "headroom": r.headroom,
        "fits": r.fits, "used_bytes": r.memory.used_bytes, "memory": dataclasses.asdict(r.memory),
        "compile_seconds": r.compile_seconds, "tokens": r.tokens, "model_flops": r.model_flops,
        "matmul_flops_per_device": r.costs.matmul_flops, "xla_flops_per_device": r.xla_flops,
        "collectives": {k: dataclasses.asdict(v) for k, v in r.costs.collectives.items()},
        "unknown_trip_loops": r.costs.unknown_trip_loops,
        "step_seconds_at_target_mfu": r.step_seconds_at_target_mfu,
        "peak_flops_per_device": r.peak_flops_per_device, "notes": r.notes,
        "compiler_refused": r.compiler_refused,
        "largest_buffers": [dataclasses.asdict(b) for b in r.buffers],
        "hbm_bytes_per_device": r.costs.hbm_bytes,
        "collective_sources": [{"kind": k, "op": op, **dataclasses.asdict(st)} for (k, op), st in r.costs.sources.items()],
        "hbm_bandwidth_per_device": r.hbm_bandwidth_per_device, "ici_bandwidth_per_device": r.ici_bandwidth_per_device,
        "chip_source": r.chip_source, "expected_collectives": r.expected_collectives,
        "generated_tokens": r.generated_tokens, "roofline_seconds": r.roofline_terms, "bound": r.bound,
        "measured": row.measured,
    }  # fmt: skip


def row_from_dict(d: dict) -> Row:
    """A Row from ``row_to_dict`` (rows written before the roofline fields read them as absent)."""
    costs = hlo_report.HloCosts(
        matmul_flops=d["matmul_flops_per_device"],
        collectives={k: hlo_report.CollectiveStats(**v) for k, v in d["collectives"].items()},
        unknown_trip_loops=d["unknown_trip_loops"], hbm_bytes=d.get("hbm_bytes_per_device", 0.0),
        sources={(s["kind"], s["op"]): hlo_report.CollectiveStats(s["count"], s["bytes"], s["wire_bytes"])
                 for s in d.get("collective_sources", [])},
    )  # fmt: skip
    report = StepReport(
        name=d["step"], topology=d["topology"], chip=d["chip"], num_devices=d["num_devices"],
        hbm_per_device=d["hbm_per_device"], headroom=d["headroom"], compile_seconds=d["compile_seconds"],
        memory=hlo_report.MemoryReport(**d["memory"]), costs=costs, xla_flops=d["xla_flops_per_device"],
        tokens=d["tokens"], model_flops=d["model_flops"],
        buffers=tuple(hlo_report.Buffer(**b) for b in d["largest_buffers"]),
        peak_flops_per_device=d["peak_flops_per_device"], notes=d["notes"], compiler_refused=d["compiler_refused"],
        hbm_bandwidth_per_device=d.get("hbm_bandwidth_per_device", 0.0),
        ici_bandwidth_per_device=d.get("ici_bandwidth_per_device"), chip_source=d.get("chip_source", ""),
        expected_collectives=d.get("expected_collectives", {}), generated_tokens=d.get("generated_tokens", 0),
    )  # fmt: skip
    return Row(Path(d["config"]), report, d.get("measured", ""))


def write_json(rows: Sequence[Row], path: str | Path) -> None:
    """Every measured number of every row, for scripts and for ``read_json``."""
    atomic_write_json(path, [row_to_dict(r) for r in rows])


def read_json(path: str | Path) -> list[Row]:
    """Rows written by ``write_json`` (to rebuild tables without recompiling)."""
    return [row_from_dict(d) for d in json.loads(Path(path).read_text())]


def work_units(paths: Sequence[Path], steps: Sequence[str], references: Sequence[str]) -> list[tuple[Path, list[str]]]:
    """One (config, compile-check arguments) unit per compiled step, in table order."""
    units = []
    for path in paths:
        if "train" in steps:
            units += [(path, ["--step", "train", "--reference", ref]) for ref in references]
        if "decode" in steps:
            units.append((path, ["--step", "decode"]))
    return units


def check_in_subprocesses(
    units: Sequence[tuple[Path, Sequence[str]]], common_args: Sequence[str], jobs: int, echo: Callable[[str], None]
) -> tuple[list[Row], list[int]]:
    """Runs ``tracealign compile-check --config P <unit args> <common args>`` per unit, ``jobs`` at a
    time: one XLA compile mostly uses one core, so separate processes use separate cores.
    Returns (rows in unit order, exit codes)."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="tracealign_aot_jobs_") as tmp:
        started: list[tuple[Path, Path, subprocess.Popen]] = []
        pending = list(enumerate(units))
        running: list[tuple[Path, Path, subprocess.Popen]] = []
        while pending or running:
            while pending and len(running) < max(1, jobs):
                i, (path, unit_args) = pending.pop(0)
                out_json, log = Path(tmp) / f"{i}.json", Path(tmp) / f"{i}.log"
                cmd = [sys.executable, "-m", "tracealign_jax.cli", "compile-check", "--config", str(path),
                       *unit_args, "--json", str(out_json), *common_args]  # fmt: skip
                with log.open("w") as sink:
                    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
                running.append((out_json, log, proc))
                started.append(running[-1])
            time.sleep(1.0)
            for item in list(running):
                if item[2].poll() is not None:
                    running.remove(item)
                    echo(item[1].read_text())
        for out_json, _, _ in started:
            if out_json.exists():
                rows += read_json(out_json)
        codes = [proc.returncode for _, _, proc in started]
    return rows, codes
