"""Public entry point for the grouped matmul of the MoE layers: ``grouped_matmul(lhs, rhs, group_sizes)``."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.gmm import backends, pallas_triton
from pallas_kernels.gmm.tiling import Tiling

IMPLEMENTATIONS = ("pallas_triton", "tokamax", "megablox", "ragged_dot")

# GPU preference, best measured first (benchmarks/RESULTS.md, "Grouped matmul"); the first available one wins.
GPU_PREFERENCE = ("pallas_triton", "tokamax")


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


def default_implementation(platform: str | None = None) -> str:
    """GPU: the first available of ``GPU_PREFERENCE``; TPU: megablox; otherwise ragged_dot."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        for name in GPU_PREFERENCE:
            if name != "tokamax" or backends.tokamax_module() is not None:
                return name
    if platform == "tpu":
        return "megablox"
    return "ragged_dot"


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, implementation: str | None = None,
                   preferred_element_type=None, tiling: Tiling | None = None,
                   interpret: bool = False) -> jax.Array:
    """Per-group matmul ``out[m] = lhs[m] @ rhs[g(m)]`` for rows sorted by group (the MoE expert matmul).

    Args:
      lhs: [M, K] rows sorted by group: group g owns rows ``offset_g .. offset_g + group_sizes[g]``.
      rhs: [G, K, N] one weight matrix per group.
      group_sizes: [G] int32, non-negative, summing to at most M; rows past the sum give zeros.
      implementation: None (best for the backend), or one of ``IMPLEMENTATIONS``.
      preferred_element_type: output dtype (default: the promoted input dtype); accumulation is float32.
      tiling: ``Tiling`` for pallas_triton (per kernel) and megablox (its ``fwd`` tile); others ignore it.
      interpret: run Pallas kernels (pallas_triton, megablox) in interpret mode, for CPU tests.

    Returns:
      [M, N]; differentiable in lhs and rhs (d_lhs = dout @ rhs[g].T, d_rhs[g] = lhs[g rows].T @ dout[g rows]).
    """
    _check_inputs(lhs, rhs, group_sizes)
    impl = implementation or default_implementation()
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype))
    if impl == "pallas_triton":
        # Triton's dot needs one operand dtype; the backward runs in it too.
        dtype = jnp.result_type(lhs.dtype, rhs.dtype)
        return pallas_triton.grouped_matmul(lhs.astype(dtype), rhs.astype(dtype), group_sizes, out_dtype,
                                            tiling or Tiling(), interpret)
    if impl == "megablox":
        return backends.megablox(lhs, rhs, group_sizes, out_dtype, tiling, interpret=interpret)
    if impl == "tokamax":
        return backends.tokamax(lhs, rhs, group_sizes, out_dtype, tiling)
    if impl == "ragged_dot":
        return backends.ragged_dot(lhs, rhs, group_sizes, out_dtype, tiling)
    raise ValueError(f"unknown grouped-matmul implementation {impl!r}; choose from {IMPLEMENTATIONS}")
