"""TPU chip kinds and topologies for ahead-of-time compilation on a machine without the chips.

``tpu_topology("v5p:4x4x2")`` returns the TPU devices of that slice as libtpu describes them
(``jax.experimental.topologies``); the compiler targets them exactly as on the pod, so memory
and FLOP figures of the compiled executable are the pod's. This needs libtpu, which the optional
``tpu-aot`` extra brings (``pip install .[tpu-aot]``); without it ``AotUnavailable`` says so.

Units: HBM in bytes (decimal GB as the vendor states it), peak FLOP/s for dense bf16 matmuls,
bandwidths in bytes/s per chip. These are the denominators of compile-check's roofline.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Sequence

import jax

from tracealign_jax.platform_env import quiet_libtpu_env

INSTALL_HINT = (
    "ahead-of-time TPU compilation needs libtpu: install the optional extra with "
    "`pip install '.[tpu-aot]'` (it pins jax[tpu] to the runtime's jax version)"
)


class AotUnavailable(RuntimeError):
    """libtpu (the ``tpu-aot`` extra) is missing or cannot describe the requested topology."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation, per chip: hbm_bytes; peak_bf16_flops per second (dense); hbm_bandwidth and
    ici_bandwidth in bytes/s (ICI: the vendor's bidirectional per-chip figure, all links together;
    None where the vendor page states none); source: the page the figures come from."""

    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float | None
    source: str


# Vendor figures, per chip, from each generation's Cloud TPU page (the "key specifications" table).
# JAX exposes one device per chip on all four.
CHIPS: dict[str, ChipSpec] = {
    # 32 GiB, 1200 GBps HBM2, 275 TFLOPs; the page states pod-level ICI figures only.
    "v4": ChipSpec("v4", 32 * 10**9, 275e12, 1200e9, None, "https://cloud.google.com/tpu/docs/v4"),
    # 16 GB, 819 GBps HBM2, 197 TFLOPs, bidirectional ICI 400 GBps per chip (1600 Gbps each way).
    "v5e": ChipSpec("v5e", 16 * 10**9, 197e12, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    # 95 GB, 2765 GBps HBM2e, 459 TFLOPs, bidirectional ICI 1200 GBps per chip (4800 Gbps each way).
    "v5p": ChipSpec("v5p", 95 * 10**9, 459e12, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"),
    # 32 GB, 1640 GBps HBM, 918 TFLOPs, bidirectional ICI 800 GBps per chip (3200 Gbps each way).
    "v6e": ChipSpec("v6e", 32 * 10**9, 918e12, 1640e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
}

# "v5litepod" is the Cloud name of v5e slices; libtpu accepts the short names.
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v5": "v5p"}
_TOPOLOGY_RE = re.compile(r"^(?P<chip>[a-z0-9]+):(?P<dims>\d+(x\d+){1,2})$")


def parse_topology(name: str) -> tuple[ChipSpec, tuple[int, ...]]:
    """``"v5p:4x4x2"`` -> (the v5p ChipSpec, (4, 4, 2)); ValueError naming the known chips otherwise."""
    match = _TOPOLOGY_RE.match(name.strip().lower())
    if not match:
        raise ValueError(f"topology '{name}': expected CHIP:AxB[xC] such as v5p:4x4x2 or v6e:4x4")
    chip = _ALIASES.get(match["chip"], match["chip"])
    if chip not in CHIPS:
        raise ValueError(f"topology '{name}': unknown chip '{match['chip']}' (known: {sorted(CHIPS)})")
    dims = tuple(int(d) for d in match["dims"].split("x"))
    return CHIPS[chip], dims


def num_chips(name: str) -> int:
    """Chips in a topology, e.g. 32 for v5p:4x4x2 (a "v5p-64" in Cloud's core-counting name)."""
    return math.prod(parse_topology(name)[1])


def libtpu_available() -> bool:
    """True when the libtpu package (the tpu-aot extra) is importable."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def tpu_topology(name: str) -> Sequence[jax.Device]:
    """The TPU devices of slice ``name`` (for ahead-of-time compilation; nothing runs on them)."""
    parse_topology(name)
    if not libtpu_available():
        raise AotUnavailable(INSTALL_HINT)
    quiet_libtpu_env()  # no local chip is used: keep libtpu from probing for a TPU VM
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # and from logging its compiler's progress
    from jax.experimental import topologies

    chip, dims = parse_topology(name)
    canonical = f"{chip.name}:{'x'.join(str(d) for d in dims)}"
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=canonical)
    except Exception as err:  # libtpu raises XlaRuntimeError / RuntimeError variants
        raise AotUnavailable(f"libtpu could not describe topology '{canonical}': {err}") from err
    return list(desc.devices)
