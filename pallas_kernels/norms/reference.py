"""The RMSNorm's definition in plain JAX (the ``xla`` implementation and the kernels' reference).

Every norm in M1 computes its statistics in float32. The rounding points are part of the definition, because the
kernels reproduce them::

    xhat = x32 * rsqrt(mean(x32^2) + eps)                  # float32
    y    = xhat.astype(norm_dtype) * weight.astype(norm_dtype)
    y    = y32 * sigmoid(gate32)                            # only with a gate (the lightning output gate)
    out  = y.astype(out_dtype)

The decoder norms use norm_dtype = x.dtype (so with bf16 activations y is rounded twice, as in the published model);
the lightning output norm uses norm_dtype = float32 and a gate, then rounds once to the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, gate: jax.Array | None, *, eps: float, norm_dtype, out_dtype
             ) -> jax.Array:
    """x [..., D], weight [D], gate [..., D] or None -> [..., D] out_dtype (see the module docstring)."""
    xf = x.astype(jnp.float32)
    xhat = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = xhat.astype(norm_dtype) * weight.astype(norm_dtype)
    if gate is not None:
        y = y.astype(jnp.float32) * jax.nn.sigmoid(gate.astype(jnp.float32))
    return y.astype(out_dtype)
