"""The device mesh and the ONE table mapping logical axis names to mesh axes.

Parameters and activations name their axes logically (``batch, length, embed, heads, kv_heads,
head_dim, mlp, vocab, layers``); only this module knows the mesh axes (``data, fsdp, tensor``).
A rule table is a tuple of ``(logical_name, mesh_axes)`` pairs, ``mesh_axes`` a mesh-axis name,
a tuple of them, or None (replicated). Within one array a mesh axis is used at most once: a later
dimension whose rule names an axis already taken is left unsharded (so activations
``(batch, length, embed)`` shard batch over ``(data, fsdp)`` and keep ``embed`` whole, while the
parameter ``(vocab, embed)`` shards ``embed`` over ``fsdp``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tracealign_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

RULE_PRESETS: dict[str, Rules] = {
    # FSDP over `fsdp` (weights sharded on their embed dim), Megatron-style tensor parallelism over
    # `tensor` (heads / mlp / vocab), batch over data x fsdp.
    "fsdp_tp": (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("layers", None),
    ),
    # Pure data parallelism: every weight replicated.
    "data_parallel": (
        ("batch", ("data", "fsdp")),
    ),
    # Decoding (``decode.rules``): no weight is sharded over `fsdp`, so no step re-gathers the model.
    # Weights are tensor-parallel over `tensor` (replicated where tensor = 1), the KV cache sharded
    # over KV heads, rows over data x fsdp. MaxText's inference rules do the same.
    "decode_tp": (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("embed", None),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("layers", None),
    ),
}


def resolve_rules(rules: Any, field: str = "mesh.rules") -> Rules:
    """Turns a preset name or a YAML list of ``[logical, mesh_axes]`` pairs into a rule table
    (errors name the config ``field`` it came from)."""
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise ConfigError(f"{field}: unknown preset '{rules}' (known: {sorted(RULE_PRESETS)})", field)
        return RULE_PRESETS[rules]
    table = []
    for i, pair in enumerate(rules):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ConfigError(f"{field}[{i}]: expected [logical_name, mesh_axes], got {pair!r}", field)
        name, axes = pair
        axes = tuple(axes) if isinstance(axes, list) else axes
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"{field}[{i}]: unknown mesh axis '{axis}' (known: {MESH_AXES})", field)
        table.append((str(name), axes))
    return tuple(table)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical ``names`` (None = unsharded)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if axes is None:
            spec.append(None)
            continue
        axes = axes if isinstance(axes, tuple) else (axes,)
        free = tuple(a for a in axes if a not in used)
        used.update(free)
        spec.append(None if not free else free[0] if len(free) == 1 else free)
    return PartitionSpec(*spec)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes; a single -1 absorbs the devices the others leave."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not divide by fsdp x tensor x data = {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data x fsdp x tensor = {math.prod(sizes)} but there are {num_devices} devices")
    return tuple(sizes)  # type: ignore[return-value]


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over ``devices`` (default: all global devices) with axes (data, fsdp, tensor).

    Device order follows ``jax.experimental.mesh_utils`` so the tensor axis lands on the fastest links.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = mesh_shape(cfg, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def initialize_distributed(cfg: MeshConfig) -> None:
    """Starts multi-process JAX when the config asks for more than one process (idempotent)."""
    if cfg.num_processes <= 1 and not cfg.coordinator:
        return
    if jax.distributed.is_initialized():
        return
    if jax.config.jax_platforms in (None, "", "cpu"):
        # CPU devices need a collectives implementation to talk across processes (no-op on TPU/GPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator:
        jax.distributed.initialize(cfg.coordinator, num_processes=cfg.num_processes, process_id=cfg.process_id)
    else:  # Cloud TPU / SLURM: everything auto-detected from the environment.
        jax.distributed.initialize()


_CURRENT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes (mesh, rules) current for ``constrain`` while tracing model/step code."""
    token = _CURRENT.set((mesh, rules))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) pair set by ``use_mesh``, or None outside one."""
    return _CURRENT.get()


def named_sharding(mesh: Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
    """NamedSharding for logical ``names`` on ``mesh``."""
    return NamedSharding(mesh, logical_to_spec(names, rules))


def to_global(host: np.ndarray, sh: NamedSharding) -> jax.Array:
    """A host array as a global array in ``sh``: every process passes the same value and contributes
    the shards of its own devices (single- and multi-process)."""
    return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside ``use_mesh``."""
    ctx = _CURRENT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, rules, names))
