"""jax's TPU splash attention ("pallas_tpu", Mosaic): causal attention with segment ids and native GQA, custom VJP.

``jax.experimental.pallas.ops.tpu.splash_attention`` takes one row at a time (q [H, T, Dh], k/v [Hkv, T, Dh]; query
head h uses KV head h // (H / Hkv), as the contract says), so the batch is vmapped. Its causal mask is static
(built from shapes at trace time, which is how it skips the tiles above the diagonal), so it takes causal sequences
only, not a KV cache at a traced index. T is padded at the end to a multiple of the block: causality hides padded
keys from real queries; with segment ids, padded tokens get an id no real token has. The kernel does not scale the
scores, so q is scaled by 1/sqrt(Dh) first (in fp32, then cast back).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.mask import SEQUENCE, Mask

PLATFORMS = ("tpu",)
BLOCK = 512  # query and key block of the forward and backward kernels
MIN_BLOCK = 128  # Mosaic's lane width: blocks along the sequence are multiples of it


def native_platforms() -> tuple[str, ...]:
    return PLATFORMS


def unsupported(q, k, mask: Mask) -> str | None:
    """Why the kernel cannot compute the call, or None."""
    del q, k
    if mask.layout != SEQUENCE:
        return "needs a causal-sequence mask (Mask.causal): no KV cache, no general slots"
    return None


def _block(length: int) -> int:
    """BLOCK, or for shorter sequences the length rounded up to MIN_BLOCK."""
    return min(BLOCK, -(-length // MIN_BLOCK) * MIN_BLOCK)


def attention(q, k, v, mask: Mask, *, interpret: bool = False):
    """q [B, T, H, Dh], k/v [B, T, Hkv, Dh], a ``Mask.causal`` -> [B, T, H, Dh]; ``interpret``: Pallas interpret
    mode (CPU)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash  # noqa: PLC0415
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask  # noqa: PLC0415

    t, nh, hd = q.shape[1:]
    block = _block(t)
    length = t + (-t % block)
    q = (q.astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))).astype(q.dtype)
    q, k, v = (jnp.pad(x, ((0, 0), (0, length - t), (0, 0), (0, 0))) for x in (q, k, v))
    segment_ids = None
    if mask.q_segment is not None:
        segment_ids = jnp.pad(mask.q_segment.astype(jnp.int32), ((0, 0), (0, length - t)),
                              constant_values=jnp.iinfo(jnp.int32).min)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * nh),
                                    block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

    def row(q, k, v, segments):  # q [T, H, Dh] -> [T, H, Dh]; the kernel is head-major
        ids = None if segments is None else splash.SegmentIds(segments, segments)
        out = kernel(*(jnp.swapaxes(x, 0, 1) for x in (q, k, v)), segment_ids=ids)
        return jnp.swapaxes(out, 0, 1)

    return jax.vmap(row)(q, k, v, segment_ids)[:, :t]
