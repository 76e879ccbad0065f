"""Pure-JAX per-group grouped matmul: the oracle for the kernels (one dense matmul per group, masked rows).

O(G) full matmuls: for tests and tiny shapes only. Gradients come from JAX autodiff of this code, so they are
independent of the kernels' hand-written backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _group_row_masks(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[G] sizes -> [G, M] bool, row m belongs to group g."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    rows = jnp.arange(num_rows, dtype=jnp.int32)
    return (rows[None, :] >= starts[:, None]) & (rows[None, :] < ends[:, None])


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   preferred_element_type=None, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """``out[m] = lhs[m] @ rhs[g(m)]``; rows in no group are zero.

    Args:
      lhs: [M, K]; rhs: [G, K, N]; group_sizes: [G] ints summing to at most M (rows sorted by group).
    Returns:
      [M, N] in ``preferred_element_type`` (default: the promoted input dtype); math in float32 or wider.
    """
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, rhs.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    masks = _group_row_masks(group_sizes, lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), acc_dtype)
    for g in range(rhs.shape[0]):
        y = jnp.dot(lhs.astype(acc_dtype), rhs[g].astype(acc_dtype), precision=precision)
        out = out + jnp.where(masks[g][:, None], y, 0)
    return out.astype(out_dtype)


def transposed_grouped_matmul(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array,
                              preferred_element_type=None, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """``out[g] = lhs[rows of g].T @ dout[rows of g]``: [M, K], [M, N] -> [G, K, N] (the weight gradient)."""
    out_dtype = preferred_element_type or jnp.result_type(lhs.dtype, dout.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    masks = _group_row_masks(group_sizes, lhs.shape[0])
    x = lhs.astype(acc_dtype)
    per_group = [jnp.dot(jnp.where(masks[g][:, None], x, 0).T, dout.astype(acc_dtype), precision=precision)
                 for g in range(group_sizes.shape[0])]
    return jnp.stack(per_group).astype(out_dtype)
