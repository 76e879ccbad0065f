"""Adapters from ``api.grouped_matmul``'s contract to the libraries that implement a grouped matmul.

Each adapter takes ``(lhs [M, K], rhs [G, K, N], group_sizes [G] int32, out_dtype, tiling)`` and returns [M, N]
with rows past ``sum(group_sizes)`` equal to zero, differentiable in lhs and rhs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import platform
from pallas_kernels.gmm import tpu_tiles
from pallas_kernels.gmm.tiling import Tiling


def _zero_rows_past_groups(out: jax.Array, group_sizes: jax.Array) -> jax.Array:
    # megablox and tokamax leave rows that belong to no group unwritten (undefined on device); the contract
    # says zero. One elementwise pass, which XLA can fuse into the consumer.
    rows = jnp.arange(out.shape[0], dtype=jnp.int32)
    return jnp.where((rows < jnp.sum(group_sizes))[:, None], out, jnp.zeros((), out.dtype))


def ragged_dot(lhs, rhs, group_sizes, out_dtype, tiling: Tiling | None):
    del tiling
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)


@functools.cache
def tokamax_module():
    """The ``tokamax`` module, or None when it is not installed (an optional dependency)."""
    try:
        import tokamax  # noqa: PLC0415  (heavy import, only when asked for)
    except ImportError:
        return None
    return tokamax


def tokamax(lhs, rhs, group_sizes, out_dtype, tiling: Tiling | None):
    del tiling  # tokamax picks its own kernel configuration
    module = tokamax_module()
    if module is None:
        raise ImportError("implementation='tokamax' needs the optional dependency tokamax "
                          "(pip install tokamax==0.0.17; it needs Python >= 3.12 and jax >= 0.11.1)")
    in_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    # tokamax 0.0.17's GPU backward rejects a cotangent wider than the operands (float32 dout, bf16 rhs), so a
    # wider output is made by a cast after the kernel: its cotangent then reaches tokamax in the operand dtype.
    # The product is rounded to the operand dtype first (bf16: about 3 significant digits).
    out = module.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=in_dtype).astype(out_dtype)
    return _zero_rows_past_groups(out, group_sizes)


def _megablox_tiling(m: int, k: int, n: int, lhs_dtype, rhs_dtype, out_dtype, tiling: Tiling | None):
    """(megablox's ``tiling`` argument, rows per tile): an explicit ``tiling.fwd`` tile, or the lookup that fits each
    kernel's tile to the scoped VMEM of the TPU being compiled for (``tpu_tiles``)."""
    if tiling is not None:
        tile = (tiling.fwd.block_m, tiling.fwd.block_k, tiling.fwd.block_n)
        return tile, tile[0]
    in_bytes = max(jnp.dtype(lhs_dtype).itemsize, jnp.dtype(rhs_dtype).itemsize)
    # The backward kernels write in the operands' dtypes, the forward in out_dtype.
    lookup = tpu_tiles.MegabloxTiling(platform.tpu_scoped_vmem_bytes(), in_bytes,
                                      max(in_bytes, jnp.dtype(out_dtype).itemsize))
    return lookup, lookup(m, k, n)[0]


def megablox_fits(k: int, n: int, tiling: Tiling | None) -> bool:
    """Whether megablox can tile K and N (it is given M padded to its row tile, but not K or N)."""
    if tiling is not None:
        return k % tiling.fwd.block_k == 0 and n % tiling.fwd.block_n == 0
    return bool(tpu_tiles.candidates(k)) and bool(tpu_tiles.candidates(n))


def megablox(lhs, rhs, group_sizes, out_dtype, tiling: Tiling | None, *, interpret: bool = False):
    """jax's Mosaic-TPU grouped matmul (custom VJP with gmm + tgmm)."""
    from jax.experimental.pallas.ops.tpu.megablox import ops  # noqa: PLC0415  (TPU-only module)

    m, k = lhs.shape
    tiles, rows = _megablox_tiling(m, k, rhs.shape[2], lhs.dtype, rhs.dtype, out_dtype, tiling)
    # megablox's d_lhs leaves rows past the groups unwritten too: selecting zeros for them here makes their
    # gradient the select's zero, whatever the kernel left there.
    lhs = _zero_rows_past_groups(lhs, group_sizes)
    # megablox needs M divisible by its row tile: pad with rows that belong to no group, and cut them off after.
    padded = lhs if m % rows == 0 else jnp.pad(lhs, ((0, -m % rows), (0, 0)))
    # Positional: megablox's custom_vjp marks (preferred_element_type, tiling, transpose_rhs, interpret) static.
    out = ops.gmm(padded, rhs, group_sizes, jnp.dtype(out_dtype), tiles, None, None, False, interpret)
    return _zero_rows_past_groups(out[:m], group_sizes)
