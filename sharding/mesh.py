"""Device meshes with the axes ("data", "expert", "sequence", "tensor").

``make_mesh("data=2,expert=2,sequence=2")`` builds an Auto-axis ``jax.sharding.Mesh`` over all devices (every process's
devices when launched as several processes: ``sharding.multihost``); axes not named have size 1 and one axis may be ``-1`` (the rest).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np

MESH_AXES = ("data", "expert", "sequence", "tensor")


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """"data=2,expert=2,sequence=2[,tensor=1]" -> {"data": 2, "expert": 2, "sequence": 2} (sizes as given; -1 kept).

    Raises ValueError on unknown axes, repeated axes, malformed items or sizes other than positive or -1.
    """
    sizes: dict[str, int] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"mesh spec item {item!r} is not of the form axis=size (in {spec!r})")
        name, text = (s.strip() for s in item.split("=", 1))
        if name not in MESH_AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            size = int(text)
        except ValueError:
            raise ValueError(f"mesh axis {name!r}: size {text!r} is not an integer") from None
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name!r}: size must be positive or -1, got {size}")
        sizes[name] = size
    return sizes


def resolve_mesh_shape(spec: str | Mapping[str, int] | None, num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES for ``num_devices`` devices: missing axes are 1, one ``-1`` takes the remaining devices.

    ``None`` or an empty spec puts every device on ``data``.
    """
    sizes = parse_mesh_spec(spec) if isinstance(spec, str) else dict(spec or {})
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; axes are {MESH_AXES}")
    if not sizes:
        sizes = {"data": -1}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: the fixed axes' product {known} does not divide the {num_devices} "
                             f"devices, so {fill[0]}=-1 cannot be filled")
        sizes[fill[0]] = num_devices // known
    shape = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
    if math.prod(shape) != num_devices:
        desc = ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, shape))
        raise ValueError(f"mesh {desc} needs {math.prod(shape)} devices but {num_devices} are available "
                         f"(jax.device_count()={jax.device_count()}); use -1 on one axis to fill the rest")
    return shape


def make_mesh(spec: str | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A Mesh with axes MESH_AXES (all Auto) over ``devices`` (default: all devices of all processes).

    Device order comes from ``jax.make_mesh`` (topology-aware: ICI/NVLink neighbours on the inner axes).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(spec, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # make_mesh's topology search rejects some device subsets; a row-major layout is always valid.
        return jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=auto)
