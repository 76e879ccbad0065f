"""Helpers shared by the layers: dtypes and parameter creation with logical axis names."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.rules import constrain_param


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


def matmul(x: jax.Array, w: jax.Array, compute_dtype) -> jax.Array:
    """``x @ w`` over the last axis of x with operands and result in ``compute_dtype``.

    Accumulation is fp32 inside the dot (XLA's bf16 GEMMs on GPU and TPU, and XLA:CPU's upcast). The result is not
    requested in fp32: an fp32 result makes the cotangent fp32, and the backward then upcasts the weight and
    all-gathers it in fp32 under FSDP. Rounding to bf16 here is what the bf16 reference does (vLLM's qkv_proj).
    """
    return jnp.einsum("...i,io->...o", x.astype(compute_dtype), w.astype(compute_dtype),
                      preferred_element_type=compute_dtype)


def param_value(p: nnx.Param, dtype) -> jax.Array:
    """The parameter's value in ``dtype`` (e.g. the bf16 compute copy of an fp32 master).

    The cast is pinned to the parameter's sharded layout (``sharding.rules.constrain_param``, active under
    ``fsdp_params()``), so FSDP all-gathers move ``dtype`` bytes. Same dtype: the stored value, untouched.
    """
    value = p[...]
    if value.dtype == jnp.dtype(dtype):
        return value
    return constrain_param(value.astype(dtype), p.get_metadata().get("out_sharding"))
