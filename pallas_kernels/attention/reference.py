"""The einsum reference ("xla"): the oracle the other backends are tested against, and the default fallback for short
sequences and single-token decode.

Scores are a dense [B, H, Tq, Tk] fp32 array: memory O(Tq x Tk), fine up to a few thousand keys and for decode
(one query row per head); ``xla_blockwise`` computes the same function in tiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.mask import Mask

MASKED = -1e30  # the score of a masked (query, key) pair before the softmax


def unsupported(q, k, mask: Mask) -> str | None:
    """Every call is supported."""
    del q, k, mask
    return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask) -> jax.Array:
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] -> [B, Tq, H, Dh] (the api contract). Gradients by autodiff."""
    b, tq, nh, hd = q.shape
    nkv = k.shape[2]
    dense = mask.dense()[:, None, None]  # [B, 1, 1, Tq, Tk]
    qg = q.reshape(b, tq, nkv, nh // nkv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(hd))
    probs = jax.nn.softmax(jnp.where(dense, scores, MASKED), axis=-1)
    probs = jnp.where(dense, probs, 0.0)  # rows with no valid key: zeros, not a uniform average
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, nh, hd).astype(q.dtype)
