"""Blockwise (online-softmax) attention in plain XLA ("xla_blockwise"): the einsum reference's function without its
[Tq, Tk] scores, for long sequences on any platform and for masks no fused kernel expresses.

Queries go in blocks of ``block_q`` (``lax.map``); for each, a ``lax.scan`` over key blocks of ``block_k`` keeps a
running max and sum. The mask is built per [block_q, block_k] tile from the slots; tiles with no visible (query, key)
pair, e.g. above the causal diagonal, are skipped (``lax.cond``). Gradients are autodiff of the loops; the query-block
function and the key step are ``jax.checkpoint``-ed, so the backward keeps one query block's per-step carries
([B, H, block_q, Dh] fp32 each), not the scores. Memory O(Tq x block_k).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.mask import Mask, slot_mask
from pallas_kernels.attention.reference import MASKED, logsumexp

BLOCK = 512  # default query and key block


def unsupported(q, k, mask: Mask) -> str | None:
    """Every call is supported."""
    del q, k, mask
    return None


def _to_blocks(x, block: int, fill):
    """x [B, T, ...] -> [T_pad / block, B, block, ...], T padded at the end with ``fill``."""
    b, t = x.shape[:2]
    pad = -t % block
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, -1, block, *x.shape[2:]), 1, 0)


def attention(q, k, v, mask: Mask, *, block_q: int = BLOCK, block_k: int = BLOCK, return_lse: bool = False):
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] -> [B, Tq, H, Dh] (the api contract), and with ``return_lse`` the fp32
    logsumexp [B, Tq, H] of each row's visible scores."""
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
        """qb [B, bq, Hkv, G, Dh] -> (out [B, bq, Hkv, G, Dh], logsumexp [B, bq, Hkv, G])."""

        def update(carry, kb, vb, block_mask):
            o, m, l = carry  # [B, Hkv, G, bq, Dh] fp32, [B, Hkv, G, bq] running max, [B, Hkv, G, bq] running sum
            s = jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, preferred_element_type=jnp.float32) * scale
            s = jnp.where(block_mask[:, None, None], s, MASKED)
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
            block_mask = slot_mask(q_slot, k_slot, q_segment, k_segment, valid)  # [B, bq, bk]
            return jax.lax.cond(jnp.any(block_mask), update, lambda c, *_: c, carry, kb, vb, block_mask), None

        stats = (b, nkv, nh // nkv, qb.shape[1])
        init = (jnp.zeros((*stats, hd), jnp.float32), jnp.full(stats, MASKED, jnp.float32),
                jnp.zeros(stats, jnp.float32))
        (o, m, l), _ = jax.lax.scan(key_step, init, kv_blocks)
        o = o / jnp.where(l > 0, l, 1.0)[..., None]  # rows with no valid key: l = 0, o = 0
        return jnp.transpose(o, (0, 3, 1, 2, 4)).astype(q.dtype), jnp.transpose(logsumexp(m, l), (0, 3, 1, 2))

    out, lse = jax.lax.map(lambda blocks: query_block(*blocks), q_blocks)  # [nq, B, bq, Hkv, G(, Dh)]
    out = jnp.moveaxis(out, 0, 1).reshape(b, -1, nh, hd)[:, :tq]
    return (out, jnp.moveaxis(lse, 0, 1).reshape(b, -1, nh)[:, :tq]) if return_lse else out
