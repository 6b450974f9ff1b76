"""From parameter metadata to shardings: abstract sharded state, shardings, and models born sharded.

``nnx.eval_shape`` returns abstract parameters without shardings (flax#5110), and an Orbax restore
onto a new mesh silently keeps the saved layout unless the abstract target carries the new
shardings. So ``abstract_model`` attaches a NamedSharding, derived from each parameter's
``logical_axes`` metadata through the rule table, to every ``jax.ShapeDtypeStruct`` itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from tracealign_jax import sharding
from tracealign_jax.model.config import ModelArch
from tracealign_jax.model.transformer import Remat, Transformer


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(state: nnx.State) -> nnx.State:
    """The state with each Variable's value replaced by its logical axis names (tuple of str)."""
    return jax.tree.map(lambda v: v.replace(tuple(v.get_metadata().get("logical_axes", ()))), state, is_leaf=_is_var)


def param_shardings(state: nnx.State, mesh: Mesh, rules: sharding.Rules) -> nnx.State:
    """NamedSharding per parameter from its ``logical_axes`` metadata (state abstract or concrete).

    The result has the structure of ``state`` (Variables holding NamedShardings), usable directly
    as jit ``in_shardings`` / ``out_shardings`` for that state.
    """

    def one(path: Any, v: nnx.Variable) -> nnx.Variable:
        names = v.get_metadata().get("logical_axes")
        shape = tuple(getattr(v.get_value(), "shape", ()))
        if names is None:
            names = (None,) * len(shape)
        if len(names) != len(shape):
            raise ValueError(f"logical_axes {names} do not match a parameter of rank {len(shape)}")
        named = sharding.named_sharding(mesh, rules, names)
        _check_divisible(path, shape, names, named.spec, mesh)
        return v.replace(named)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def _check_divisible(path: Any, shape: tuple[int, ...], names: Any, spec: Any, mesh: Mesh) -> None:
    """Refuses (naming parameter, dimension and mesh setting) a dimension the mesh axes it maps to do not
    divide, e.g. mesh.tensor=16 over 8 KV heads, instead of jax's bare IndivisibleError. KV heads are not
    replicated across extra tensor shards: choose mesh.tensor dividing num_key_value_heads."""
    from tracealign_jax.config import ConfigError

    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        ways = 1
        for a in axes:
            ways *= mesh.shape[a]
        if size % ways:
            where = "/".join(str(getattr(k, "key", k)) for k in path)
            setting = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
            raise ConfigError(f"{setting}: does not divide the '{names[dim]}' dimension ({size}) of parameter {where} "
                              f"{shape}; choose a mesh whose {'/'.join(axes)} size divides {size}")


def _constructor(arch: ModelArch, dtype: Any, param_dtype: Any, remat: Remat, scan_layers: bool, seed: int):
    return lambda: Transformer(arch, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers,
                               rngs=nnx.Rngs(seed))


def abstract_model(
    arch: ModelArch,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: Remat = "none",
    scan_layers: bool = True,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) without allocating: ShapeDtypeStructs carrying NamedShardings.

    Without a mesh the ShapeDtypeStructs have no sharding (single-device use).
    """
    abstract = nnx.eval_shape(_constructor(arch, dtype, param_dtype, remat, scan_layers, 0))
    graphdef, state = nnx.split(abstract)
    if mesh is None:
        return graphdef, state
    if rules is None:
        raise ValueError("abstract_model: rules are required with a mesh")
    shardings = param_shardings(state, mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return graphdef, state


def init_model(
    arch: ModelArch,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: Remat = "none",
    scan_layers: bool = True,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
) -> Transformer:
    """A randomly initialised model; with a mesh each parameter is created directly on its shards
    (the init is jitted with ``out_shardings``, so no device ever holds a whole sharded weight)."""
    make = _constructor(arch, dtype, param_dtype, remat, scan_layers, seed)
    graphdef, abstract = abstract_model(arch, dtype=dtype, param_dtype=param_dtype, remat=remat, scan_layers=scan_layers,
                                        mesh=mesh, rules=rules)
    if mesh is not None and rules is None:
        raise ValueError("init_model: rules are required with a mesh")
    # One jitted init instead of an eager op per parameter (each eager op would compile on its own).
    out_shardings = None if mesh is None else jax.tree.map(lambda a: a.sharding, abstract)
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: Transformer, mesh: Mesh, rules: sharding.Rules) -> Transformer:
    """The same model with every parameter moved onto its NamedSharding."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, param_shardings(state, mesh, rules))
    return nnx.merge(graphdef, state)
