"""RMSNorm with float32 statistics (every norm in M1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.layers.common import param


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps)`` computed in fp32, cast back to x's dtype, times the weight (init 1, no offset)."""

    def __init__(self, dim: int, eps: float, *, axes=("embed",), param_dtype: str = "float32", rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), axes, fill=1.0, dtype_name=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)
