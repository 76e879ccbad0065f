"""Token embedding and the (optionally fp32) LM head."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

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


def _bf16_exact(dtype) -> bool:
    """Whether every value of ``dtype`` is a bf16 value (its split has no low part)."""
    return jnp.dtype(dtype) == jnp.bfloat16


def split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """x -> (hi, lo), both bf16, hi = bf16(x), lo = bf16(x - hi): x = hi + lo up to 2^-16 |x|.

    lo is None when x is bf16 already (hi = x exactly, lo would be all zeros).
    """
    if _bf16_exact(x.dtype):
        return x, None
    x = x.astype(jnp.float32)
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


@dataclasses.dataclass(frozen=True)
class HeadMatmul:
    """How every LM-head matmul multiplies (``lm_logits``, the model's logits, the fused cross-entropy's forward and
    its hand-written backward); built by ``head_matmul`` from the model's settings.

    A product contracting axis ``ka`` of a with axis ``kb`` of b (one axis each; result = a's other axes, then b's) is
    ``dot(lhs(a, ka, b.dtype), rhs(b, kb, a.dtype), (ka, kb))``: ``lhs``/``rhs`` prepare an operand once, so an operand
    used by several products (the hidden states across vocabulary chunks) is prepared once; ``matmul`` is the
    differentiable one-call form.

    Plain modes (``split=False``): the operands are cast to ``operand_dtype`` and multiplied at ``precision``.

    Split mode (``"bf16_3x_fused"``): each fp32 operand x is split into bf16 hi + lo (``split_bf16``) and
    a·b ~= a_hi·b_hi + a_hi·b_lo + a_lo·b_hi (the dropped a_lo·b_lo and the splits' own roundings are ~2^-16 relative,
    3 x 2^-16 for a product in the worst case; the products of bf16 values are exact and accumulate in fp32). The
    three products are ONE bf16 GEMM over a 3x longer contraction: lhs = [a_hi | a_hi | a_lo], rhs = [b_hi ; b_lo ;
    b_hi], stacked on a new axis right before the contracted one, so that (stack, K) is a row-major K-concatenation
    (a free reshape) that the dot contracts together. One GEMM rather than three (or two): the logits GEMM has a
    short K (the hidden size) and a large [tokens, chunk] fp32 output, so separate GEMMs would each write (and the
    sum re-read) that output, while one long-K GEMM writes it once and keeps the sum in its fp32 accumulator; for
    dh = dZ Wᵀ (K = the chunk) the three GEMMs would read the same operand bytes as the concatenation, so nothing is
    lost there. A new stacking axis rather than a jnp.concatenate along K: K is the token axis in dW = hᵀ dZ, which
    is sharded over the data axes, and stacking each device's shard keeps it sharded where a concatenation of
    sharded arrays would need resharding. A bf16 operand (the bf16 hidden states of training, bf16 weights) has no
    low part, so its terms are dropped: a_hi·b_hi + a_hi·b_lo, K = 2x (the same sum, the dropped term is exactly 0).
    The split itself is elementwise: XLA fuses it into the fusion that writes each GEMM's stacked operand, so an
    operand used by two products (a weight chunk in dh and in the recomputed logits) is read once per product in
    fp32 rather than split into a stored hi/lo pair that both products then re-read.
    """
    operand_dtype: Any
    precision: Any = None
    split: bool = False

    def lhs(self, a: jax.Array, axis: int, rhs_dtype) -> jax.Array:
        """a prepared as the left operand, contracted on ``axis``, against a right operand of ``rhs_dtype``."""
        if not self.split:
            return a.astype(self.operand_dtype)
        hi, lo = split_bf16(a)
        blocks = [hi] + ([] if _bf16_exact(rhs_dtype) else [hi]) + ([] if lo is None else [lo])
        return jnp.stack(blocks, axis=axis)

    def rhs(self, b: jax.Array, axis: int, lhs_dtype) -> jax.Array:
        """b prepared as the right operand, contracted on ``axis``, against a left operand of ``lhs_dtype``."""
        if not self.split:
            return b.astype(self.operand_dtype)
        hi, lo = split_bf16(b)
        blocks = [hi] + ([] if lo is None else [lo]) + ([] if _bf16_exact(lhs_dtype) else [hi])
        return jnp.stack(blocks, axis=axis)

    def dot(self, a: jax.Array, b: jax.Array, axes: tuple[int, int]) -> jax.Array:
        """Prepared a, b -> fp32 product contracting a's ``axes[0]`` with b's ``axes[1]`` (axes of the unprepared
        operands)."""
        ka, kb = axes
        contract = ((ka, ka + 1), (kb, kb + 1)) if self.split else ((ka,), (kb,))
        return jax.lax.dot_general(a, b, (contract, ((), ())), precision=self.precision,
                                   preferred_element_type=jnp.float32)

    def matmul(self, a: jax.Array, b: jax.Array, axes: tuple[int, int]) -> jax.Array:
        """Differentiable a·b (the gradients multiply the same way, with fp32 cotangents). Split mode: a [M, K] or
        [K, M], or [..., K] contracted on its last axis; b 2-D."""
        if not self.split:
            return self.dot(self.lhs(a, axes[0], b.dtype), self.rhs(b, axes[1], a.dtype), axes)
        if a.ndim > 2 and axes[0] == a.ndim - 1:
            out = _split_matmul(a.reshape(-1, a.shape[-1]), b, (1, axes[1]))
            return out.reshape(*a.shape[:-1], out.shape[-1])
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"split head matmul takes 2-D operands (or [..., K] x [K, N]); got {a.shape}, {b.shape} "
                             f"contracting {axes}")
        return _split_matmul(a, b, axes)


_SPLIT = HeadMatmul(jnp.dtype(jnp.float32), None, split=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _split_matmul(a, b, axes):
    """2-D a, b -> fp32 split-mode product; its VJP is split-mode products of the fp32 cotangent (autodiff of the
    bf16 parts would round the cotangent to bf16)."""
    return _SPLIT.dot(_SPLIT.lhs(a, axes[0], b.dtype), _SPLIT.rhs(b, axes[1], a.dtype), axes)


def _split_matmul_fwd(a, b, axes):
    return _split_matmul(a, b, axes), (a, b)


def _split_matmul_bwd(axes, residuals, g):
    """g [a free, b free] fp32. da = g bᵀ laid out as a, db = aᵀ g laid out as b (1 - k is an operand's free axis)."""
    a, b = residuals
    ka, kb = axes
    da = _split_matmul(g, b, (1, 1 - kb)) if ka == 1 else _split_matmul(b, g, (1 - kb, 1))
    db = _split_matmul(a, g, (1 - ka, 0)) if kb == 0 else _split_matmul(g, a, (0, 1 - ka))
    return da.astype(a.dtype), db.astype(b.dtype)


_split_matmul.defvjp(_split_matmul_fwd, _split_matmul_bwd)


def head_matmul(fp32: bool, precision: str, compute_dtype) -> HeadMatmul:
    """How the LM head multiplies.

    ``fp32=False``: operands in the compute dtype, default precision. ``fp32=True``: fp32 operands, multiplied at
    HIGHEST (``precision="float32"``), with XLA's three-pass bf16 algorithm (``"bf16_3x"``: near-fp32 products on
    bf16 tensor cores, three GEMMs), or with the same three bf16 products as one GEMM of split operands
    (``"bf16_3x_fused"``, ``HeadMatmul``); see ``m1jax.config.LM_HEAD_PRECISIONS``.
    """
    if not fp32:
        return HeadMatmul(jnp.dtype(compute_dtype))
    if precision == "float32":
        return HeadMatmul(jnp.dtype(jnp.float32), jax.lax.Precision.HIGHEST)
    if precision == "bf16_3x":
        return HeadMatmul(jnp.dtype(jnp.float32), jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3)
    if precision == "bf16_3x_fused":
        return _SPLIT
    raise ValueError(f"LM head precision must be one of {LM_HEAD_PRECISIONS}, got {precision!r}")


def lm_logits(h: jax.Array, kernel: jax.Array, *, fp32: bool, compute_dtype, precision: str = "float32") -> jax.Array:
    """h [..., D] x kernel [D, V] -> float32 logits [..., V].

    With ``fp32=True`` both operands are fp32 (or split into bf16 pairs that carry fp32's precision): M1's RL only
    worked once the head was computed in FP32 (the train/inference probability mismatch came from high-magnitude
    activations here). The stored weight keeps its dtype.
    """
    return head_matmul(fp32, precision, compute_dtype).matmul(h, kernel, (h.ndim - 1, 0))
