"""jax's Pallas TPU paged attention ("pallas_tpu", Mosaic): reads only a row's filled pages.

``jax.experimental.pallas.ops.tpu.paged_attention`` runs a grid (row, KV head) whose steps walk the row's pages in
blocks of ``pages_per_compute_block`` pages, up to its last filled block (the block count comes from ``lengths``,
prefetched into SMEM), with the next block's pages DMA'd into VMEM behind the current one's compute, and an online
softmax in fp32. A TensorCore runs the grid steps one after another, so splitting a row's context into parallel
parts, as the GPU kernel does, would add a merge without adding parallelism on the single-core chips (v5e, v6e);
the kernel's megacore split over KV heads or rows (v4, v5p) is left off, as jax advises unless the chip is known
to run in megacore mode.

The kernel does not scale the scores, so q is passed scaled by 1/sqrt(D) in fp32 (the kernel computes in fp32 anyway;
q is [B, H, D], small next to the pages). Mosaic wants D a multiple of 128 and page_size a multiple of 16 (bf16
sublane tiles).
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.compat import pltpu

PLATFORMS = ("tpu",)
BLOCK_TOKENS = 512  # tokens per compute block: pages_per_compute_block = the largest divisor of the table <= this


def native_platforms() -> tuple[str, ...]:
    return PLATFORMS


def pages_per_block(pages_per_sequence: int, page_size: int) -> int:
    limit = max(1, BLOCK_TOKENS // page_size)
    return max(n for n in range(1, min(pages_per_sequence, limit) + 1) if pages_per_sequence % n == 0)


def unsupported(q, k_pages, page_indices) -> str | None:
    """Why the kernel cannot compute the call, or None."""
    del page_indices
    d, page_size = q.shape[-1], k_pages.shape[2]
    if d % 128:
        return f"needs a head dim that is a multiple of 128 (got {d})"
    if page_size % 16:
        return f"needs a page size that is a multiple of 16 (got {page_size})"
    return None


def paged_attention(q, k_pages, v_pages, lengths, page_indices, *, interpret: bool = False):
    """The api contract (q [B, H, D], pages [Hkv, N, page_size, D], lengths [B], page_indices [B, P] -> [B, H, D]);
    ``interpret``: Pallas TPU interpret mode (CPU)."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged  # noqa: PLC0415

    d = q.shape[-1]
    scaled = q.astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    pages = pages_per_block(page_indices.shape[1], k_pages.shape[2])
    args = (scaled, k_pages, v_pages.astype(k_pages.dtype), lengths.astype(jnp.int32), page_indices.astype(jnp.int32))
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = tpu_paged(*args, pages_per_compute_block=pages)
    else:
        out = tpu_paged(*args, pages_per_compute_block=pages)
    return out.astype(q.dtype)
