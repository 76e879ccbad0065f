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


def logsumexp(m: jax.Array, total: jax.Array) -> jax.Array:
    """log(sum_j exp(s_j)) from the running max m and total = sum_j exp(s_j - m); MASKED where total is 0 (a row
    with no visible key). m must carry no gradient (the result does not depend on it)."""
    return jnp.where(total > 0, m + jnp.log(jnp.where(total > 0, total, 1.0)), MASKED)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, *, return_lse: bool = False):
    """q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh] -> [B, Tq, H, Dh] (the api contract), and with ``return_lse`` the fp32
    logsumexp [B, Tq, H] of each row's visible scores. Gradients by autodiff."""
    b, tq, nh, hd = q.shape
    nkv = k.shape[2]
    dense = mask.dense()[:, None, None]  # [B, 1, 1, Tq, Tk]
    qg = q.reshape(b, tq, nkv, nh // nkv, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(hd))
    scores = jnp.where(dense, scores, MASKED)
    m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    e = jnp.where(dense, jnp.exp(scores - m), 0.0)  # rows with no valid key: zeros, not a uniform average
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out.reshape(b, tq, nh, hd).astype(q.dtype)
    if not return_lse:
        return out
    lse = logsumexp(m, total)[..., 0]  # [B, Hkv, G, Tq]
    return out, jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, tq, nh)
