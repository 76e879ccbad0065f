"""Softmax attention layer (every 8th M1 layer): GQA, partial NeoX RoPE, fp32 softmax (spec section 4)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.layers.common import matmul, param

_MASKED = -1e30


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


def attention_mask(q_slot, k_slot, q_segment=None, k_segment=None, k_valid=None):
    """[B, Tq, Tk] bool: causal by slot, same segment, and valid keys.

    q_slot: [B, Tq] / k_slot: [B, Tk] slot indices (positions in the sequence or the KV cache).
    """
    mask = k_slot[:, None, :] <= q_slot[:, :, None]
    if q_segment is not None:
        mask &= q_segment[:, :, None] == k_segment[:, None, :]
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


class SoftmaxAttention(nnx.Module):
    """h [B, T, D] -> [B, T, D]; optional KV cache (k, v: [B, S, Hkv, Dh]) written at slots index .. index+T-1."""

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
          cache_start: [B] first valid slot per row (left padding).
        Returns (out [B, T, D], updated (k, v) or None).
        """
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        b, t, _ = h.shape
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = apply_rope(matmul(h, self.q_proj[...], cdt).reshape(b, t, nh, hd), positions, cfg.rotary_dim,
                       cfg.rope_theta)
        k = apply_rope(matmul(h, self.k_proj[...], cdt).reshape(b, t, nkv, hd), positions, cfg.rotary_dim,
                       cfg.rope_theta)
        v = matmul(h, self.v_proj[...], cdt).reshape(b, t, nkv, hd)
        q_slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        new_cache = None
        if kv_cache is None:
            mask = attention_mask(q_slot, q_slot, segment_ids, segment_ids)
        else:
            k_cache, v_cache = kv_cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k_cache, v_cache)
            k, v = k_cache.astype(cdt), v_cache.astype(cdt)
            k_slot = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32)[None], (b, k.shape[1]))
            mask = attention_mask(q_slot + cache_index, k_slot, k_valid=k_slot >= cache_start[:, None])
        out = grouped_query_attention(q, k, v, mask)
        return matmul(out.reshape(b, t, nh * hd), self.o_proj[...], cdt), new_cache


def grouped_query_attention(q, k, v, mask):
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh], mask [B, Tq, Tk] -> [B, Tq, H, Dh]. Query head h uses KV head
    h // (H / Hkv); scale 1/sqrt(Dh); softmax in fp32. Rows with no valid key give zeros."""
    b, tq, nh, hd = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, tq, nkv, nh // nkv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(hd))
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(mask[:, None, None], probs, 0.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, nh, hd).astype(q.dtype)
