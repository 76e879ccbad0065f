"""Token embedding and the (optionally fp32) LM head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import LM_HEAD_PRECISIONS
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


def head_operands(fp32: bool, precision: str, compute_dtype):
    """(operand dtype, dot precision) of the LM head matmul.

    ``fp32=False``: operands in the compute dtype, default precision. ``fp32=True``: fp32 operands, multiplied at
    HIGHEST (``precision="float32"``) or with XLA's three-pass bf16 algorithm (``"bf16_3x"``: near-fp32 products on
    bf16 tensor cores; see ``m1jax.config.LM_HEAD_PRECISIONS``).
    """
    if not fp32:
        return compute_dtype, None
    if precision == "float32":
        return jnp.float32, jax.lax.Precision.HIGHEST
    if precision == "bf16_3x":
        return jnp.float32, jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3
    raise ValueError(f"LM head precision must be one of {LM_HEAD_PRECISIONS}, got {precision!r}")


def lm_logits(h: jax.Array, kernel: jax.Array, *, fp32: bool, compute_dtype, precision: str = "float32") -> jax.Array:
    """h [..., D] x kernel [D, V] -> float32 logits [..., V].

    With ``fp32=True`` both operands are fp32: M1's RL only worked once the head was computed in FP32 (the
    train/inference probability mismatch came from high-magnitude activations here). The stored weight keeps its dtype.
    """
    operand_dtype, dot_precision = head_operands(fp32, precision, compute_dtype)
    return jnp.einsum("...d,dv->...v", h.astype(operand_dtype), kernel.astype(operand_dtype),
                      preferred_element_type=jnp.float32, precision=dot_precision)
