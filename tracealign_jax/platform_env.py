"""Process environment defaults that must be set before JAX is imported.

libtpu (installed by the ``tpu-aot`` extra for ahead-of-time compiles) probes for a TPU VM whenever
JAX starts; on a machine without TPU chips it prints ``E0000 ... INVALID_ARGUMENT`` lines about
worker hostnames at every command. These defaults answer its probes with a local, chip-less slice:
it loads quietly, finds no chips and JAX falls back to the GPU / CPU backends (whose own warnings are
left alone). Values already in the environment are kept.

XLA's CPU backend: jaxlib 0.10 routes dots and elementwise fusions through YNNPACK
(``xla_cpu_experimental_ynn_fusion_type``), whose backward-pass dots ran on one of this 2-core
machine's two threads. ``cpu_xla_defaults`` turns those fusions off (Eigen's multi-threaded dots take
them; ``import tracealign_jax`` applies it): the DPO step of ``benchmarks/train_bench.py`` at prompt 512 + response 128 went from 3499 to
2584 ms (6.62 -> 4.87 CPU-s), at 64 + 64 from 516 to 389 ms (2026-12-03). CPU flags only; TPU / GPU
compiles never read them.
"""

from __future__ import annotations

import glob
import os
from importlib import metadata

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FLAG_JAXLIB = ("0.10.",)  # jaxlib releases known to accept the flag (an unknown XLA flag aborts the process)


def tpu_chips_present() -> bool:
    """True on a TPU VM: ``/dev/accel*`` (v2-v5e) or ``/dev/vfio`` (v5p, v6e)."""
    return bool(glob.glob("/dev/accel*")) or os.path.isdir("/dev/vfio")


def quiet_libtpu_env() -> None:
    """libtpu defaults for a process that uses no local TPU chip (CPU / GPU runs, AOT compiles)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # libtpu takes a machine-wide lockfile meant for real chips; compile-only processes may coexist.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def cpu_xla_defaults() -> None:
    """Appends ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusions) to ``XLA_FLAGS`` unless
    the environment already sets that flag or the installed jaxlib is not one known to accept it.
    Call before JAX starts its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags:
        return
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    if version.startswith(YNN_FLAG_JAXLIB):
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
