"""Softmax attention layer (every 8th M1 layer): GQA, partial NeoX RoPE, fp32 softmax (spec section 4)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.layers.common import matmul, param
from sharding.sequence_parallel import attention_sequence_parallel, sequence_shards

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
        # cuDNN flash attention on GPU, except under a sequence-sharded mesh (the all-gathered K/V path below).
        use_fused = segment_ids is None and t > 1 and sequence_shards(t) <= 1
        fused = fused_attention_implementation(q.dtype) if use_fused else None
        if fused is not None and kv_cache is None:
            out = flash_attention(q, k, v, causal=True, implementation=fused)[0]
            return matmul(out.reshape(b, t, nh * hd), self.o_proj[...], cdt), None
        if fused is not None:
            k_cache, v_cache = kv_cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            out = chunk_attention(q, k.astype(k_cache.dtype).astype(cdt), v.astype(v_cache.dtype).astype(cdt),
                                  k_cache.astype(cdt), v_cache.astype(cdt), cache_index, cache_start,
                                  implementation=fused)
            return matmul(out.reshape(b, t, nh * hd), self.o_proj[...], cdt), (k_cache, v_cache)
        if (kv_cache is None and segment_ids is not None and t > 1 and sequence_shards(t) <= 1
                and fused_attention_implementation(q.dtype) is not None):
            # Packed documents on GPU: a flash kernel with segment masking instead of the [T, T] score matrix.
            out = packed_flash_attention(q, k, v, segment_ids)
            return matmul(out.reshape(b, t, nh * hd), self.o_proj[...], cdt), None
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
        if kv_cache is None and sequence_shards(t) > 1:  # mesh with sequence > 1: K/V all-gathered over it
            out = attention_sequence_parallel(q, k, v, segment_ids, attention_mask=attention_mask,
                                              grouped_query_attention=grouped_query_attention)
        else:
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


# ------------------------------------------------------------------------------------------------ fused (GPU) path
def fused_attention_implementation(dtype) -> str | None:
    """'cudnn' on GPU for bf16/fp16 (cuDNN's flash attention: no [T, S] score matrix), else None: the einsum path
    above (CPU, fp32, packed segments, single-token decode, which is a memory-bound read of the cache)."""
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return None


def flash_attention(q, k, v, *, causal, q_lengths=None, kv_lengths=None, implementation="cudnn"):
    """q [B, T, H, Dh], k/v [B, S, Hkv, Dh] -> (out [B, T, H, Dh], logsumexp [B, T, H] float32), scale 1/sqrt(Dh).

    Valid queries/keys are the first ``q_lengths`` / ``kv_lengths`` [B] of each row (None: all); causal is aligned
    top-left (query i sees keys <= i). ``implementation`` "xla" is jax's reference of the same call (CPU tests).
    """
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    if implementation == "cudnn":
        # The public jax.nn.dot_product_attention casts the logsumexp to the output dtype (bf16), too coarse to merge
        # partial attentions; the cuDNN wrapper underneath returns it in fp32 ([B, H, T] layout).
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
        padded = q_lengths is not None or kv_lengths is not None
        b, t, s = q.shape[0], q.shape[1], k.shape[1]
        mask = {(False, False): cudnn_attention.MaskType.NO_MASK, (False, True): cudnn_attention.MaskType.CAUSAL,
                (True, False): cudnn_attention.MaskType.PADDING,
                (True, True): cudnn_attention.MaskType.PADDING_CAUSAL}[(padded, causal)]
        if padded:
            q_lengths = jnp.full((b,), t, jnp.int32) if q_lengths is None else q_lengths.astype(jnp.int32)
            kv_lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
        out, lse = cudnn_attention.dot_product_attention(q, k, v, None, None, q_lengths, kv_lengths, scale=scale,
                                                         mask_type=mask, return_residual=True)
        return out, jnp.transpose(lse, (0, 2, 1)).astype(jnp.float32)
    out, lse = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_lengths,
                                            key_value_seq_lengths=kv_lengths, implementation=implementation,
                                            return_residual=True)
    return out, lse.astype(jnp.float32)


def _shift_rows(x, shift):
    """out[b, i] = x[b, (i + shift[b]) % L] for x [B, L, ...], shift [B] int (a per-row roll to the left)."""
    return jax.vmap(lambda row, s: jnp.roll(row, -s, axis=0))(x, shift)


def chunk_attention(q, k_new, v_new, k_cache, v_cache, cache_index, cache_start, *, implementation="cudnn"):
    """A prefill chunk against the KV cache with flash attention, as two calls merged by their logsumexps.

    q [B, T, H, Dh] and k_new/v_new [B, T, Hkv, Dh] are the chunk (slots index .. index+T-1); k_cache/v_cache
    [B, S, Hkv, Dh]; cache_start [B] first valid slot (left padding). Returns [B, T, H, Dh] (zeros for padded queries).

    The kernels mask only a row's tail (sequence lengths) and align causality top-left, so each row is rolled left by
    its padding: (1) past: the chunk attends non-causally to the rolled cache's first index - start slots; (2) intra:
    the rolled chunk attends causally to itself. Same function as ``grouped_query_attention`` with the slot mask.
    """
    b, t = q.shape[:2]
    past_len = jnp.maximum(cache_index - cache_start, 0)
    rolled = jax.lax.cond(jnp.any(cache_start > 0), lambda kv: tuple(_shift_rows(x, cache_start) for x in kv),
                          lambda kv: kv, (k_cache, v_cache))
    o_past, lse_past = flash_attention(q, *rolled, causal=False, kv_lengths=jnp.maximum(past_len, 1),
                                       implementation=implementation)
    pad = jnp.clip(cache_start - cache_index, 0, t)  # padded slots at the front of this chunk
    o_in, lse_in = flash_attention(*(_shift_rows(x, pad) for x in (q, k_new, v_new)), causal=True,
                                   q_lengths=jnp.maximum(t - pad, 1), kv_lengths=jnp.maximum(t - pad, 1),
                                   implementation=implementation)
    o_in, lse_in = _shift_rows(o_in, -pad), _shift_rows(lse_in, -pad)
    valid = (jnp.arange(t)[None, :] >= pad[:, None])[:, :, None]  # [B, T, 1]
    lse_past = jnp.where((past_len > 0)[:, None, None], lse_past, -jnp.inf)
    lse_in = jnp.where(valid, lse_in, 0.0)
    m = jnp.maximum(lse_past, lse_in)
    w_past, w_in = jnp.exp(lse_past - m), jnp.exp(lse_in - m)  # [B, T, H]
    o_past = jnp.where((past_len > 0)[:, None, None, None], o_past.astype(jnp.float32), 0.0)
    out = (w_past[..., None] * o_past + w_in[..., None] * o_in.astype(jnp.float32)) / (w_past + w_in)[..., None]
    return jnp.where(valid[..., None], out, 0.0).astype(q.dtype)


def packed_flash_attention(q, k, v, segment_ids, *, block: int = 128, interpret: bool = False):
    """Causal attention within packed documents with jax's Pallas (Triton) flash-attention kernel (custom VJP).

    q [B, T, H, Dh], k/v [B, T, Hkv, Dh], segment_ids [B, T] -> [B, T, H, Dh]; scale 1/sqrt(Dh). The kernel has no
    GQA, so K/V heads are repeated (h -> h // (H / Hkv), as ``grouped_query_attention``); T is padded to the block
    with a segment id no real token has, so padded keys are never attended.
    """
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, t, nh, hd = q.shape
    group = nh // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    pad = -t % block
    segment_ids = segment_ids.astype(jnp.int32)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).min)
    sizes = pallas_attention.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                        block_q_dq=block, block_kv_dq=block)
    out = pallas_attention.mha(q, k, v, segment_ids, sm_scale=1.0 / float(hd) ** 0.5, causal=True,
                               block_sizes=sizes, interpret=interpret)
    return out[:, :t]
