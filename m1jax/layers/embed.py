"""Token embedding and the (optionally fp32) LM head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.layers.common import param


class Embed(nnx.Module):
    """tokens [B, T] int -> [B, T, D] in the compute dtype. No scaling (M1 does not scale embeddings)."""

    def __init__(self, vocab_size: int, dim: int, *, std: float, param_dtype: str = "float32", rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab_size, dim), ("vocab", "embed"), std=std, dtype_name=param_dtype)

    def __call__(self, tokens: jax.Array, compute_dtype) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(compute_dtype)


class LMHead(nnx.Module):
    """The untied LM head weight [D, V]; ``lm_logits`` applies it (the model also applies a tied embedding with it)."""

    def __init__(self, dim: int, vocab_size: int, *, std: float, param_dtype: str = "float32", rngs: nnx.Rngs):
        self.kernel = param(rngs, (dim, vocab_size), ("embed", "vocab"), std=std, dtype_name=param_dtype)


def lm_logits(h: jax.Array, kernel: jax.Array, *, fp32: bool, compute_dtype) -> jax.Array:
    """h [..., D] x kernel [D, V] -> float32 logits [..., V].

    With ``fp32=True`` both operands are fp32: M1's RL only worked once the head was computed in FP32 (the
    train/inference probability mismatch came from high-magnitude activations here). The stored weight keeps its dtype.
    """
    operand_dtype = jnp.float32 if fp32 else compute_dtype
    precision = jax.lax.Precision.HIGHEST if fp32 else None
    return jnp.einsum("...d,dv->...v", h.astype(operand_dtype), kernel.astype(operand_dtype),
                      preferred_element_type=jnp.float32, precision=precision)
