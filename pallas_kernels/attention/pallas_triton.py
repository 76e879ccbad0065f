"""jax's Pallas (Triton) flash attention ("pallas_triton", GPUs): causal attention with segment ids, custom VJP.

The kernel (``jax.experimental.pallas.ops.gpu.attention.mha``) has no GQA, so K/V heads are repeated
(h -> h // (H / Hkv), as the contract says), and needs the length to be a multiple of its block, so T is padded at
the end. Padded keys come after every real query, so causality hides them; with segment ids, padded tokens get an id
no real token has (so they attend only to each other and no row is empty, which would give NaN gradients).
"""
from __future__ import annotations

import warnings

import jax.numpy as jnp

from pallas_kernels.attention.mask import SEQUENCE, Mask

PLATFORMS = ("cuda", "rocm")
BLOCK = 128  # query and key block of the forward and both backward kernels
MIN_BLOCK = 16  # Triton's smallest dot


def native_platforms() -> tuple[str, ...]:
    return PLATFORMS


def unsupported(q, k, mask: Mask) -> str | None:
    """Why the kernel cannot compute the call, or None."""
    del q, k
    if mask.layout != SEQUENCE:
        return "needs a causal-sequence mask (Mask.causal): no KV cache, no general slots"
    return None


def _block(length: int) -> int:
    """BLOCK, or for shorter sequences the smallest power of two >= length (at least MIN_BLOCK)."""
    return min(BLOCK, max(MIN_BLOCK, 1 << (length - 1).bit_length()))


def attention(q, k, v, mask: Mask, *, interpret: bool = False):
    """q [B, T, H, Dh], k/v [B, T, Hkv, Dh], a ``Mask.causal`` -> [B, T, H, Dh]; ``interpret``: Pallas interpret
    mode (CPU)."""
    with warnings.catch_warnings():  # jax points to tokamax, which this project does not require
        warnings.filterwarnings("ignore", message=".*pallas.ops.gpu.attention is deprecated")
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # noqa: PLC0415

    t, nh, hd = q.shape[1:]
    group = nh // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    block = _block(t)
    pad = -t % block
    segment_ids = None if mask.q_segment is None else mask.q_segment.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                        block_q_dq=block, block_kv_dq=block)
    out = pallas_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / float(hd) ** 0.5, causal=True,
                               block_sizes=sizes, interpret=interpret)
    return out[:, :t]
