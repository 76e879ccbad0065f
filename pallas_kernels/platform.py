"""Pick code by the platform a program is lowered for, not by the host it is traced on.

``jax.default_backend()`` names the host's devices. A program exported with ``jax.export(..., platforms=("tpu",))``
or compiled for a TPU topology from a CPU host must still get the TPU kernel, and a CPU run must still get the XLA
path (or the kernel in Pallas interpret mode). ``jax.lax.platform_dependent`` does this: every branch is traced, and
the one for the target platform is lowered (a multi-platform export keeps one branch per platform and the choice is
made just before compilation). The op families' ``api.py`` use the two functions below for every decision that used
to read ``jax.default_backend()``.

All branches are traced, so each must trace for the given shapes on any host; a branch that could not (a kernel's
shape constraints, a library the host lacks) must not be offered for that call. Tracing them all costs time: the
families pass functions jitted once per configuration, so a model's repeated calls reuse their traces.

Kernels whose tiles depend on the TPU generation read it at trace time with ``tpu_device_kind`` (the device of the
mesh set by ``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh``, which a compile for a TPU topology from a CPU host
has, or this host's TPU) and size their tiles to ``tpu_scoped_vmem_bytes``.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax

# The lowering platforms the families choose for ("cpu" also serves any platform not named here).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
GPU = ("cuda", "rocm")
# The scoped VMEM a Mosaic kernel may use without raising its limit, by jax.Device.device_kind, as the TPU compiler
# reports it when a kernel exceeds it ("Scoped allocation with size ... and limit ..."): v5e and v5p 16 MiB, v6e 32 MiB.
SCOPED_VMEM_BYTES = {"TPU v5 lite": 16 * 2 ** 20, "TPU v5": 16 * 2 ** 20, "TPU v5p": 16 * 2 ** 20,
                     "TPU v6 lite": 32 * 2 ** 20}


def select(functions: Mapping[str, Callable], *args, fallback: Callable | None = None):
    """``functions[p](*args)`` for the platform p being lowered for; ``fallback(*args)`` for platforms not in
    ``functions`` (None: lowering for such a platform is an error).

    Platforms mapped to the same function object share one traced branch; when there is only one function and a
    fallback, it is called directly and nothing is staged.
    """
    branches = {p: f for p, f in functions.items() if f is not fallback}
    if not branches and fallback is not None:
        return fallback(*args)
    return jax.lax.platform_dependent(*args, default=fallback, **branches)


def kernel(fn: Callable, native: Sequence[str], *args):
    """An explicitly requested kernel: ``fn(*args, interpret=False)`` when lowering for one of its ``native``
    platforms, ``fn(*args, interpret=True)`` (Pallas interpret mode, or the kernel's XLA stand-in) when lowering for
    cpu; lowering for any other platform is an error (the kernel does not exist there)."""
    compiled = functools.partial(fn, interpret=False)
    return select({"cpu": functools.partial(fn, interpret=True), **{p: compiled for p in native}}, *args)


def tpu_device_kind() -> str | None:
    """The device_kind of the TPU being traced for: the current mesh's device (a topology compile from any host), else
    this host's first device when it is a TPU, else None."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None:
        return device.device_kind if device.platform == "tpu" else None
    default = jax.devices()[0]
    return default.device_kind if default.platform == "tpu" else None


def tpu_scoped_vmem_bytes() -> int:
    """``SCOPED_VMEM_BYTES`` of the TPU being traced for; the smallest of the table when it is unknown (tracing on a
    CPU without a mesh, a generation not in the table), so that the tiles fit any of them."""
    return SCOPED_VMEM_BYTES.get(tpu_device_kind(), min(SCOPED_VMEM_BYTES.values()))
