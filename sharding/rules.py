"""Logical axis names (used in ``m1jax/``) -> mesh axes: the one rules table, parameter shardings, activations.

Parameters carry logical names in their ``out_sharding`` metadata (``m1jax.layers.common.param``); the stacked
periods add a leading ``layers`` axis. Activations are annotated with ``constrain(x, ("batch", "length", None))``.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

# logical name -> mesh axes (a tuple, applied in order; axes that do not divide the dimension are dropped).
LOGICAL_AXIS_RULES: Mapping[str, tuple[str, ...]] = {
    "batch": ("data", "expert"),   # outside the MoE the expert devices act as data parallel (MaxText does this)
    "length": ("sequence",),
    "embed": (),                   # fsdp=True: ("data", "expert", "sequence"), params and optimizer state sharded ZeRO-3 style
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "experts": ("expert",),
    "layers": (),
}
FSDP_RULES: Mapping[str, tuple[str, ...]] = {"embed": ("data", "expert", "sequence")}  # axes taken are skipped
# Whether the parameters being traced are FSDP-sharded (``fsdp_params``): read by ``constrain_param``.
_FSDP_PARAMS = contextvars.ContextVar("fsdp_params", default=False)


def _mesh_axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else {}


def logical_to_mesh_spec(logical_spec: Sequence[str | None] | P, rules: Mapping | None = None, fsdp: bool = False,
                         *, shape: Sequence[int] | None = None, mesh=None) -> P:
    """("layers", "experts", "embed", "mlp") -> P(None, "expert", None, "tensor")
    (fsdp: P(None, "expert", ("data", "sequence"), "tensor"): "expert" is taken by the experts dim).

    Names not in the table are replicated. With ``shape`` and ``mesh``, mesh axes absent from the mesh, of size 1,
    already used by an earlier dimension, or not dividing the dimension are dropped, so any shape gets a valid spec.
    """
    table = dict(LOGICAL_AXIS_RULES if rules is None else rules)
    if fsdp:
        table.update(FSDP_RULES)
    sizes = _mesh_axis_sizes(mesh)
    used: set[str] = set()
    out = []
    for dim, name in enumerate(logical_spec):
        if name is None:
            out.append(None)
            continue
        names = (name,) if isinstance(name, str) else tuple(name)
        axes = [a for n in names for a in table.get(n, ())]
        kept = []
        for axis in axes:
            if axis in used:
                continue
            if mesh is not None:
                if sizes.get(axis, 1) == 1:
                    continue
                if shape is not None and shape[dim] % (math.prod(sizes[a] for a in kept) * sizes[axis]):
                    continue
            kept.append(axis)
            used.add(axis)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _logical_names(variable: nnx.Variable, ndim: int):
    names = variable.get_metadata().get("out_sharding")
    return tuple(names) if names is not None and len(names) == ndim else (None,) * ndim


def state_shardings(state: Any, mesh: jax.sharding.Mesh, fsdp: bool = False) -> Any:
    """NamedSharding pytree mirroring ``state`` (an nnx State of params, or of an ``nnx.Optimizer``).

    Variables use their ``out_sharding`` logical names; optimizer-state variables carry the names of their
    parameter (nnx.Optimizer copies the metadata), so moments mirror the params; anything else is replicated.
    """
    def one(leaf):
        if _is_variable(leaf):
            value = leaf.get_value() if hasattr(leaf, "get_value") else leaf.value
            ndim = len(getattr(value, "shape", ()))
            spec = logical_to_mesh_spec(_logical_names(leaf, ndim), fsdp=fsdp, shape=value.shape, mesh=mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, state, is_leaf=_is_variable)


def tree_shardings_like(tree: Any, params: Any, param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a plain pytree (e.g. an optax state built from pure params): every subtree whose structure equals
    ``params``' gets ``param_shardings``; all other leaves are replicated."""
    params_def = jax.tree_util.tree_structure(params)

    def is_param_like(x):
        return jax.tree_util.tree_structure(x) == params_def

    def one(x):
        if is_param_like(x):
            return param_shardings
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), x)

    return jax.tree_util.tree_map(one, tree, is_leaf=is_param_like)


def shard_state(state: Any, mesh: jax.sharding.Mesh, fsdp: bool = False) -> Any:
    """``state`` placed on ``mesh`` by ``state_shardings`` (jax.device_put)."""
    return jax.device_put(state, state_shardings(state, mesh, fsdp))


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """The activation helper: ``with_sharding_constraint`` to the rules' spec under an Auto mesh set by
    ``jax.set_mesh``; a no-op with no mesh, and for mesh axes that are manual (inside ``jax.shard_map``)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_mesh_spec(logical_names, shape=x.shape, mesh=mesh)
    manual = set(mesh.manual_axes)
    if manual:
        spec = P(*(_drop_axes(e, manual) for e in spec))
    if all(e is None for e in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


@contextlib.contextmanager
def fsdp_params(enabled: bool = True) -> Iterator[None]:
    """Declare, while a step is traced, that its parameters are placed by ``state_shardings(..., fsdp=enabled)``.

    The layers then cast each fp32 master to the compute dtype in its sharded layout (``constrain_param``), so the
    per-layer FSDP all-gathers move bf16, not fp32. Enter it around the first call (the trace) of the jitted
    function, next to ``jax.set_mesh``; it is not part of jit's cache key, so trace a given jitted function under one
    setting only. Without it, or with ``fsdp=False`` shardings, nothing changes.
    """
    token = _FSDP_PARAMS.set(enabled)
    try:
        yield
    finally:
        _FSDP_PARAMS.reset(token)


def fsdp_params_active() -> bool:
    """Whether the step being traced declared FSDP parameter layouts (``fsdp_params``)."""
    return _FSDP_PARAMS.get()


def param_spec(logical_names: Sequence[str | None], shape: Sequence[int], mesh) -> P:
    """The mesh spec of a parameter with these logical names while a step is traced: its FSDP layout under
    ``fsdp_params()``, the plain rules' layout otherwise (what ``state_shardings`` gives it in either case)."""
    return logical_to_mesh_spec(logical_names, fsdp=_FSDP_PARAMS.get(), shape=shape, mesh=mesh)


def constrain_param(x: jax.Array, logical_names: Sequence[str | None] | None) -> jax.Array:
    """A parameter's value after a cast (``x``, e.g. the bf16 copy of an fp32 master), pinned to the parameter's own
    FSDP layout under ``fsdp_params()`` and ``jax.set_mesh``: the cast then runs on the local shard and the all-gather
    that the consumer needs moves ``x.dtype``. Without that, XLA may gather the fp32 master and cast after.

    ``logical_names``: the Param's ``out_sharding`` (a leading "layers" name of stacked periods is skipped when ``x``
    is one period's slice). A no-op without fsdp_params, without a mesh, and inside shard_map.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not _FSDP_PARAMS.get() or mesh.empty or mesh.manual_axes or logical_names is None:
        return x
    names = tuple(logical_names)
    if len(names) == x.ndim + 1 and names[0] == "layers":
        names = names[1:]
    if len(names) != x.ndim:
        return x
    spec = logical_to_mesh_spec(names, fsdp=True, shape=x.shape, mesh=mesh)
    return x if all(e is None for e in spec) else jax.lax.with_sharding_constraint(x, spec)


def _drop_axes(entry, axes: set[str]):
    if entry is None:
        return None
    kept = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a not in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def batch_sharding(mesh: jax.sharding.Mesh, shape: Sequence[int],
                   logical_names: Sequence[str | None] = ("batch", "length")) -> NamedSharding:
    """NamedSharding of an input batch (tokens, targets, segment ids [B, T]) under the rules table."""
    return NamedSharding(mesh, logical_to_mesh_spec(tuple(logical_names), shape=shape, mesh=mesh))
