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
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax

# The lowering platforms the families choose for ("cpu" also serves any platform not named here).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
GPU = ("cuda", "rocm")


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
