"""Softmax attention layer (every 8th M1 layer): GQA, partial NeoX RoPE, fp32 softmax (spec section 4)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.layers.common import matmul, param, param_value
from sharding.sequence_parallel import attention_sequence_parallel, sequence_shards

_MASKED = -1e30
# Without a fused kernel, attention over more keys than this runs blockwise (``blockwise_attention``: memory
# O(Tq x block) instead of the [B, H, Tq, Tk] fp32 scores, which are 1 GiB per sequence at 64 heads and 2048 x 2048);
# shorter sequences and single-token decode (scores [B, H, 1, Tk], linear in Tk) keep the einsum reference.
BLOCKWISE_MIN_KEYS = 2048
ATTENTION_BLOCK = 512  # query and key block of ``blockwise_attention``


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


@dataclasses.dataclass(frozen=True)
class SlotMask:
    """``attention_mask``'s arguments, unevaluated: blockwise attention builds only [B, block_q, block_k] pieces of it.

    Constructed with ``attention_mask``'s signature, so it can stand in for it (sharding.sequence_parallel takes the
    mask builder and the attention function as arguments).
    """
    q_slot: jax.Array                   # [B, Tq]
    k_slot: jax.Array                   # [B, Tk]
    q_segment: jax.Array | None = None  # [B, Tq]
    k_segment: jax.Array | None = None  # [B, Tk]
    k_valid: jax.Array | None = None    # [B, Tk] bool

    def dense(self) -> jax.Array:
        """[B, Tq, Tk] bool."""
        return attention_mask(self.q_slot, self.k_slot, self.q_segment, self.k_segment, self.k_valid)


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
        q = apply_rope(matmul(h, param_value(self.q_proj, cdt), cdt).reshape(b, t, nh, hd), positions, cfg.rotary_dim,
                       cfg.rope_theta)
        k = apply_rope(matmul(h, param_value(self.k_proj, cdt), cdt).reshape(b, t, nkv, hd), positions, cfg.rotary_dim,
                       cfg.rope_theta)
        v = matmul(h, param_value(self.v_proj, cdt), cdt).reshape(b, t, nkv, hd)
        q_slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        new_cache = None
        # cuDNN flash attention on GPU, except under a sequence-sharded mesh (the all-gathered K/V path below).
        use_fused = segment_ids is None and t > 1 and sequence_shards(t) <= 1
        fused = fused_attention_implementation(q.dtype) if use_fused else None
        if fused is not None and kv_cache is None:
            out = flash_attention(q, k, v, causal=True, implementation=fused)[0]
            return matmul(out.reshape(b, t, nh * hd), param_value(self.o_proj, cdt), cdt), None
        if fused is not None:
            k_cache, v_cache = kv_cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            out = chunk_attention(q, k.astype(k_cache.dtype).astype(cdt), v.astype(v_cache.dtype).astype(cdt),
                                  k_cache.astype(cdt), v_cache.astype(cdt), cache_index, cache_start,
                                  implementation=fused)
            return matmul(out.reshape(b, t, nh * hd), param_value(self.o_proj, cdt), cdt), (k_cache, v_cache)
        if (kv_cache is None and segment_ids is not None and t > 1 and sequence_shards(t) <= 1
                and fused_attention_implementation(q.dtype) is not None):
            # Packed documents on GPU: a flash kernel with segment masking instead of the [T, T] score matrix.
            out = packed_flash_attention(q, k, v, segment_ids)
            return matmul(out.reshape(b, t, nh * hd), param_value(self.o_proj, cdt), cdt), None
        if kv_cache is None:
            mask = SlotMask(q_slot, q_slot, segment_ids, segment_ids)
        else:
            k_cache, v_cache = kv_cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k_cache, v_cache)
            k, v = k_cache.astype(cdt), v_cache.astype(cdt)
            k_slot = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32)[None], (b, k.shape[1]))
            mask = SlotMask(q_slot + cache_index, k_slot, k_valid=k_slot >= cache_start[:, None])
        if kv_cache is None and sequence_shards(t) > 1:  # mesh with sequence > 1: K/V all-gathered over it
            out = attention_sequence_parallel(q, k, v, segment_ids, attention_mask=SlotMask,
                                              grouped_query_attention=masked_attention)
        else:
            out = masked_attention(q, k, v, mask)
        return matmul(out.reshape(b, t, nh * hd), param_value(self.o_proj, cdt), cdt), new_cache


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


def masked_attention(q, k, v, mask: SlotMask):
    """``grouped_query_attention`` with the mask given as slots: blockwise past ``BLOCKWISE_MIN_KEYS`` keys (for
    Tq > 1), else the einsum reference on the dense mask. Shapes as ``grouped_query_attention``."""
    if q.shape[1] > 1 and k.shape[1] > BLOCKWISE_MIN_KEYS:
        return blockwise_attention(q, k, v, mask)
    return grouped_query_attention(q, k, v, mask.dense())


def _to_blocks(x, block: int, fill):
    """x [B, T, ...] -> [T_pad / block, B, block, ...], T padded at the end with ``fill``."""
    b, t = x.shape[:2]
    pad = -t % block
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, -1, block, *x.shape[2:]), 1, 0)


def blockwise_attention(q, k, v, mask: SlotMask, *, block_q: int = ATTENTION_BLOCK, block_k: int = ATTENTION_BLOCK):
    """The function of ``grouped_query_attention`` (GQA, scale 1/sqrt(Dh), fp32 softmax, zeros for rows with no
    valid key) computed flash-style: queries in blocks of ``block_q`` (``lax.map``), and for each, a ``lax.scan``
    over key blocks of ``block_k`` with a running max and sum (online softmax).

    q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh], mask: SlotMask (built per block, never [Tq, Tk]) -> [B, Tq, H, Dh].
    Memory: scores of one [block_q, block_k] tile per step. Key blocks with no valid (query, key) pair, e.g. above
    the causal diagonal, are skipped (``lax.cond``). Gradients are autodiff of the loops; both the query-block
    function and the key step are ``jax.checkpoint``-ed, so the backward keeps one query block's per-step carries
    ([B, H, block_q, Dh] fp32 each), not the scores.
    """
    b, tq, nh, hd = q.shape
    tk, nkv = k.shape[1], k.shape[2]
    bq, bk = min(block_q, tq), min(block_k, tk)
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))
    k_valid = jnp.ones((b, tk), bool) if mask.k_valid is None else mask.k_valid
    q_blocks = (_to_blocks(q.reshape(b, tq, nkv, nh // nkv, hd), bq, 0), _to_blocks(mask.q_slot, bq, 0),
                None if mask.q_segment is None else _to_blocks(mask.q_segment, bq, 0))
    kv_blocks = (_to_blocks(k, bk, 0), _to_blocks(v, bk, 0), _to_blocks(mask.k_slot, bk, 0),
                 None if mask.k_segment is None else _to_blocks(mask.k_segment, bk, 0),
                 _to_blocks(k_valid, bk, False))  # padded keys are invalid

    @jax.checkpoint
    def query_block(qb, q_slot, q_segment):
        """qb [B, bq, Hkv, G, Dh] -> [B, bq, Hkv, G, Dh]."""

        def update(carry, kb, vb, block_mask):
            o, m, l = carry  # [B, Hkv, G, bq, Dh] fp32, [B, Hkv, G, bq] running max, [B, Hkv, G, bq] running sum
            s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
            s = jnp.where(block_mask[:, None, None], s, _MASKED)
            # The result does not depend on the max (it cancels between o and l): no gradient through it.
            m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
            p = jnp.where(block_mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
            rescale = jnp.exp(m - m_new)
            o = o * rescale[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb,
                                                    preferred_element_type=jnp.float32)
            return o, m_new, l * rescale + jnp.sum(p, axis=-1)

        @jax.checkpoint
        def key_step(carry, kv):
            kb, vb, k_slot, k_segment, valid = kv
            block_mask = attention_mask(q_slot, k_slot, q_segment, k_segment, valid)  # [B, bq, bk]
            return jax.lax.cond(jnp.any(block_mask), update, lambda c, *_: c, carry, kb, vb, block_mask), None

        stats = (b, nkv, nh // nkv, qb.shape[1])
        init = (jnp.zeros((*stats, hd), jnp.float32), jnp.full(stats, _MASKED, jnp.float32),
                jnp.zeros(stats, jnp.float32))
        (o, _, l), _ = jax.lax.scan(key_step, init, kv_blocks)
        o = o / jnp.where(l > 0, l, 1.0)[..., None]
        return jnp.transpose(o, (0, 3, 1, 2, 4)).astype(q.dtype)

    out = jax.lax.map(lambda blocks: query_block(*blocks), q_blocks)  # [nq, B, bq, Hkv, G, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, nh, hd)[:, :tq]


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
    t = q.shape[1]
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

    t, nh, hd = q.shape[1:]
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
