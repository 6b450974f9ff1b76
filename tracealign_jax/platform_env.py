"""Process environment defaults that must be set before JAX is imported.

libtpu (installed by the ``tpu-aot`` extra for ahead-of-time compiles) probes for a TPU VM whenever
JAX starts; on a machine without TPU chips it prints ``E0000 ... INVALID_ARGUMENT`` lines about
worker hostnames at every command. These defaults answer its probes with a local, chip-less slice:
it loads quietly, finds no chips and JAX falls back to the GPU / CPU backends (whose own warnings are
left alone). Values already in the environment are kept.
"""

from __future__ import annotations

import glob
import os


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
