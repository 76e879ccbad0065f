"""Softmax attention layer (every 8th M1 layer): projections, GQA, partial NeoX RoPE, the KV-cache write; the
attention itself is ``pallas_kernels.attention`` (fp32 softmax; backend by ``cfg.attention_implementation``)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.cache import PagedKV
from m1jax.config import ModelConfig
from m1jax.layers.common import matmul, param, param_value
from pallas_kernels.attention import Mask, attention
from pallas_kernels.attention.paged import paged_attention
from sharding.kernel_parallel import attention_batch_head_parallel
from sharding.sequence_parallel import attention_sequence_parallel, sequence_shards


def apply_rope(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """NeoX (rotate-half) RoPE on the first ``rotary_dim`` dims of each head; the rest pass through.

    x: [B, T, H, Dh]; positions: [B, T] absolute positions. Pairs are (i, i + rotary_dim/2), inv_freq_i =
    theta^(-2i/rotary_dim). Computed in fp32.
    """
    if rotary_dim == 0:
        return x
    half = rotary_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary_dim)  # [half]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


def _chunk_mask(lengths: jax.Array, t: int, s: int) -> Mask:
    """Queries at positions lengths[b] .. lengths[b] + t - 1 against s cache slots. One row is a KV-cache mask (which
    the fused kernels take); several rows at different positions need the general slot mask."""
    if lengths.shape[0] == 1:
        return Mask.cache(lengths[0], t, s, jnp.zeros((1,), jnp.int32))
    b = lengths.shape[0]
    q_slot = lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    return Mask(q_slot, jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s)))


class SoftmaxAttention(nnx.Module):
    """h [B, T, D] -> [B, T, D]; optional KV cache (k, v: [B, S, Hkv, Dh]) written at slots index .. index+T-1, or a
    paged cache (``PagedKV``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, std, pd = cfg.hidden_size, cfg.initializer_range, cfg.param_dtype
        kv = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = param(rngs, (d, cfg.attention_width), ("embed", "heads"), std=std, dtype_name=pd)
        self.k_proj = param(rngs, (d, kv), ("embed", "kv"), std=std, dtype_name=pd)
        self.v_proj = param(rngs, (d, kv), ("embed", "kv"), std=std, dtype_name=pd)
        self.o_proj = param(rngs, (cfg.attention_width, d), ("heads", "embed"), std=std, dtype_name=pd)

    def __call__(self, h, positions, *, segment_ids=None, kv_cache=None, cache_index=None, cache_start=None):
        """Args:
          h: [B, T, D]; positions: [B, T] RoPE positions; segment_ids: [B, T] or None (no cache).
          kv_cache: (k, v) each [B, S, Hkv, Dh] or None; cache_index: int32 scalar slot of the first new token;
          cache_start: [B] first valid slot per row (left padding). Or the layer's ``PagedKV``: the new keys and
          values are written into the rows' pages, then one token per row attends through ``paged_attention`` and
          a chunk through its pages gathered into a contiguous cache.
        Returns (out [B, T, D], updated (k, v), or the updated ``PagedKV``, or None).
        """
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        b, t, _ = h.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = apply_rope(matmul(h, param_value(self.q_proj, cdt), cdt).reshape(b, t, nh, hd), positions, cfg.rotary_dim,
                       cfg.rope_theta)
        k = apply_rope(matmul(h, param_value(self.k_proj, cdt), cdt).reshape(b, t, nkv, hd), positions, cfg.rotary_dim,
                       cfg.rope_theta)
        v = matmul(h, param_value(self.v_proj, cdt), cdt).reshape(b, t, nkv, hd)
        attend = functools.partial(attention, implementation=cfg.attention_implementation)
        new_cache = None
        # Under a mesh the kernel runs per device on its batch rows and heads (no-op without a mesh); the sequence-
        # sharded path below has its own shard_map.
        local = functools.partial(attention_batch_head_parallel, attention=attend)
        if isinstance(kv_cache, PagedKV):
            new_cache = kv_cache.write(k, v)
            if t == 1:
                out = paged_attention(q[:, 0], new_cache.k_pages, new_cache.v_pages,
                                      new_cache.lengths + new_cache.num_new, new_cache.layer_pages())[:, None]
            else:
                k_ctx, v_ctx = new_cache.gather()
                out = local(q, k_ctx.astype(cdt), v_ctx.astype(cdt), _chunk_mask(new_cache.lengths, t, k_ctx.shape[1]))
        elif kv_cache is not None:
            k_cache, v_cache = (jax.lax.dynamic_update_slice(c, x.astype(c.dtype), (0, cache_index, 0, 0))
                                for c, x in zip(kv_cache, (k, v)))
            new_cache = (k_cache, v_cache)
            mask = Mask.cache(cache_index, t, k_cache.shape[1], cache_start)
            out = local(q, k_cache.astype(cdt), v_cache.astype(cdt), mask)
        elif sequence_shards(t) > 1:  # mesh with sequence > 1: K/V all-gathered over it
            out = attention_sequence_parallel(q, k, v, segment_ids, attention_mask=Mask, attention=attend)
        else:
            out = local(q, k, v, Mask.causal(b, t, segment_ids))
        return matmul(out.reshape(b, t, nh * hd), param_value(self.o_proj, cdt), cdt), new_cache
