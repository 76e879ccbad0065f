"""Public entry point for the grouped matmul of the MoE layers: ``grouped_matmul(lhs, rhs, group_sizes)``.

``implementation=None`` decides per platform the program is lowered for (``pallas_kernels.platform``): cuda/rocm:
the first available of ``GPU_PREFERENCE``; tpu: megablox when K and N fit its tiles, else ragged_dot; cpu:
ragged_dot. An explicit Pallas backend (pallas_triton, megablox) runs compiled on its platform and in Pallas
interpret mode when lowered for cpu.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.gmm import backends, pallas_triton
from pallas_kernels.gmm.tiling import Tiling

IMPLEMENTATIONS = ("pallas_triton", "tokamax", "megablox", "ragged_dot")

# GPU preference, best measured first (benchmarks/RESULTS.md, "Grouped matmul"); the first available one wins.
GPU_PREFERENCE = ("pallas_triton", "tokamax")
_NATIVE_PLATFORMS = {"pallas_triton": platform.GPU, "megablox": ("tpu",)}  # the Pallas kernels, where they compile


def _check_inputs(lhs, rhs, group_sizes):
    if lhs.ndim != 2:
        raise ValueError(f"lhs must be [M, K]; got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs must be [G, K, N]; got shape {rhs.shape}")
    if group_sizes.ndim != 1 or group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"group_sizes must be [G]=({rhs.shape[0]},); got shape {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"contraction sizes differ: lhs [M, K]={lhs.shape}, rhs [G, K, N]={rhs.shape}")
    if group_sizes.dtype != jnp.int32:
        raise TypeError(f"group_sizes must be int32; got {group_sizes.dtype}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array; got {x.dtype}")


def default_implementation(target: str, k: int, n: int, tiling: Tiling | None = None) -> str:
    """The implementation ``implementation=None`` uses when lowering for platform ``target`` with rhs [G, K, N]
    (see the module docstring)."""
    if target in platform.GPU:
        for name in GPU_PREFERENCE:
            if name != "tokamax" or backends.tokamax_module() is not None:
                return name
    if target == "tpu" and backends.megablox_fits(k, n, tiling):
        return "megablox"
    return "ragged_dot"


def _operands(lhs, rhs, cast_rhs: bool = True):
    """The operands in the dtype the product runs in. A wider floating rhs (fp32 master weights with bf16 rows) is
    multiplied in lhs's dtype, ``lhs @ rhs.astype(lhs.dtype)``: rounded here (``cast_rhs``), or by the kernel's
    custom VJP (pallas_triton, which then writes d_rhs in rhs's dtype from its fp32 accumulator, without the bf16
    rounding and the cast pass of the cast's gradient). Otherwise both in their promoted dtype."""
    if jnp.finfo(rhs.dtype).bits > jnp.finfo(lhs.dtype).bits:
        return lhs, (rhs.astype(lhs.dtype) if cast_rhs else rhs)
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    return lhs.astype(dtype), rhs.astype(dtype)


def _in_product_dtype(fn):
    """fn(lhs, rhs, group_sizes, ...) with its operands first brought to the product's dtype (``_operands``)."""
    def wrapped(lhs, rhs, *args, **kwargs):
        return fn(*_operands(lhs, rhs), *args, **kwargs)
    return wrapped


@functools.cache
def _implementation(name: str, out_dtype, tiling: Tiling | None):
    """name -> jitted fn(lhs, rhs, group_sizes[, interpret]) -> [M, N]. One object per arguments, so that the many
    calls of a model (and the per-platform branches, all traced) reuse one trace per shape."""
    if name == "pallas_triton":
        def triton(lhs, rhs, group_sizes, interpret=False):
            # Triton's dot needs one operand dtype; the backward runs in it too. A wider rhs: see _operands.
            lhs, rhs = _operands(lhs, rhs, cast_rhs=False)
            return pallas_triton.grouped_matmul(lhs, rhs, group_sizes, out_dtype, tiling or Tiling(), interpret)
        return jax.jit(triton, static_argnames="interpret")
    if name == "megablox":
        return jax.jit(_in_product_dtype(functools.partial(backends.megablox, out_dtype=out_dtype, tiling=tiling)),
                       static_argnames="interpret")
    if name == "tokamax":
        return jax.jit(_in_product_dtype(functools.partial(backends.tokamax, out_dtype=out_dtype, tiling=tiling)))
    if name == "ragged_dot":
        return jax.jit(_in_product_dtype(functools.partial(backends.ragged_dot, out_dtype=out_dtype, tiling=tiling)))
    raise ValueError(f"unknown grouped-matmul implementation {name!r}; choose from {IMPLEMENTATIONS}")


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, implementation: str | None = None,
                   preferred_element_type=None, tiling: Tiling | None = None) -> jax.Array:
    """Per-group matmul ``out[m] = lhs[m] @ rhs[g(m)]`` for rows sorted by group (the MoE expert matmul).

    Args:
      lhs: [M, K] rows sorted by group: group g owns rows ``offset_g .. offset_g + group_sizes[g]``.
      rhs: [G, K, N] one weight matrix per group. A wider rhs than lhs (fp32 master weights with bf16 rows) is
        multiplied in lhs's dtype, as ``lhs @ rhs.astype(lhs.dtype)``; its gradient comes back in rhs's dtype
        (pallas_triton writes d_rhs from its fp32 accumulator: no bf16 rounding of it, and no cast pass after it).
      group_sizes: [G] int32, non-negative, summing to at most M; rows past the sum give zeros.
      implementation: None (per target platform, see the module docstring), or one of ``IMPLEMENTATIONS``.
      preferred_element_type: output dtype (default: the promoted input dtype); accumulation is float32.
      tiling: ``Tiling`` for pallas_triton (per kernel) and megablox (its ``fwd`` tile); others ignore it.

    Returns:
      [M, N]; differentiable in lhs and rhs (d_lhs = dout @ rhs[g].T, d_rhs[g] = lhs[g rows].T @ dout[g rows]).
    """
    _check_inputs(lhs, rhs, group_sizes)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    args = (lhs, rhs, group_sizes)
    if implementation is None:
        chosen = {p: default_implementation(p, rhs.shape[1], rhs.shape[2], tiling) for p in platform.PLATFORMS}
        return platform.select({p: _implementation(name, out_dtype, tiling) for p, name in chosen.items()}, *args,
                               fallback=_implementation(chosen["cpu"], out_dtype, tiling))
    if implementation in _NATIVE_PLATFORMS:
        return platform.kernel(_implementation(implementation, out_dtype, tiling), _NATIVE_PLATFORMS[implementation],
                               *args)
    return _implementation(implementation, out_dtype, tiling)(*args)
