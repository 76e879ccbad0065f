"""Helpers shared by the layers: dtypes and parameter creation with logical axis names."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], *, std: float | None = None,
          fill: float | None = None, dtype_name: str = "float32") -> nnx.Param:
    """A parameter annotated with logical axis names (mapped to mesh axes only by ``sharding.rules``).

    ``std`` draws N(0, std^2); ``fill`` makes a constant (norm weights). ``eager_sharding=False`` keeps the
    annotation as metadata so modules can be built with no mesh (CPU tests, abstract init).
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    dt = jnp.dtype(dtype_name)
    if fill is not None:
        value = jnp.full(shape, fill, dt)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def matmul(x: jax.Array, w: jax.Array, compute_dtype, out_dtype=None) -> jax.Array:
    """``x @ w`` over the last axis of x with operands in ``compute_dtype`` and fp32 accumulation."""
    y = jnp.einsum("...i,io->...o", x.astype(compute_dtype), w.astype(compute_dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(out_dtype or compute_dtype)
