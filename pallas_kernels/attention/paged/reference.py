"""The paged-attention reference ("xla"): gather each row's pages into a contiguous K/V, mask by length, einsum.

The oracle the kernels are tested against and the fallback where no kernel runs (cpu, shapes a kernel does not
take). It reads every page of a row's table, filled or not (memory O(B x pages_per_sequence x page_size)); the
kernels read only the filled pages.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import MASKED


def unsupported(q, k_pages, page_indices) -> str | None:
    """Every call is supported."""
    del q, k_pages, page_indices
    return None


def gather_pages(pages: jax.Array, page_indices: jax.Array) -> jax.Array:
    """pages [Hkv, total_pages, page_size, D], page_indices [B, P] -> [B, P * page_size, Hkv, D]: each row's pages in
    table order (slot s of row b is slot s % page_size of page page_indices[b, s // page_size]). Indices are clipped
    to the page range, so table entries past a row's filled pages may hold anything."""
    n_kv, total, page_size, d = pages.shape
    b, p = page_indices.shape
    rows = pages[:, jnp.clip(page_indices, 0, total - 1)]  # [Hkv, B, P, page_size, D]
    return jnp.transpose(rows, (1, 2, 3, 0, 4)).reshape(b, p * page_size, n_kv, d)


def paged_attention(q, k_pages, v_pages, lengths, page_indices):
    """q [B, H, D] against each row's first lengths[b] cache slots -> [B, H, D] (the api contract)."""
    b, nh, d = q.shape
    n_kv = k_pages.shape[0]
    k, v = gather_pages(k_pages, page_indices), gather_pages(v_pages, page_indices)  # [B, S, Hkv, D]
    valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]                    # [B, S]
    qg = q.reshape(b, n_kv, nh // n_kv, d)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
    mask = valid[:, None, None]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1), 0.0)  # empty rows: zeros
    v = jnp.where(valid[:, :, None, None], v, jnp.zeros((), v.dtype))  # unfilled slots may hold anything
    out = jnp.einsum("bkgs,bskd->bkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, nh, d).astype(q.dtype)
