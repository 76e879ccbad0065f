"""jax's Pallas (Triton) paged attention ("pallas_triton", GPUs): flash decoding over the filled pages.

``jax.experimental.pallas.ops.gpu.paged_attention`` runs a grid (KV head, query-head block, context split) per row:
each program walks its split's pages in blocks of ``pages_per_compute_block`` pages, stops at the row's last
filled page (splits past it do nothing), keeps an online softmax in fp32, and the splits' partial results are merged
by their maxima and sums afterwards. The kernel does not scale the scores, so q is scaled by 1/sqrt(D) first (in
fp32, then rounded to the cache dtype: Triton's dot takes one operand dtype).

Triton's blocks must be powers of two: D and ``page_size x pages_per_compute_block`` (>= 16); the query heads of one
KV head are padded to a block of 16.
"""
from __future__ import annotations

import warnings

import jax.numpy as jnp

PLATFORMS = ("cuda", "rocm")
BLOCK_H = 16               # query heads per program (the kernel's minimum; a KV head's group is padded to it)
MAX_PAGES_PER_BLOCK = 8    # pages per compute block (the kernel's default)
# Launch config from a sweep on an H200 at m1-1b's decode step (64 rows x 128K tokens, 2 KV heads, D 64, 128-token
# pages; `benchmarks/RESULTS.md`): blocks of 128 tokens, 4 warps and no software pipelining took 1.43-1.58 ms a
# layer (1.45x its KV read) at 8 to 32 splits; the kernel's defaults (8 warps, 2 stages) with 256-token blocks took
# 2.4-2.8 ms. The loop's page gather is not pipelined by Triton either way, so more programs in flight (small blocks,
# few warps, many splits) is what hides the memory latency.
MAX_BLOCK_TOKENS = 128
NUM_WARPS = 4
NUM_STAGES = 1
MAX_SPLITS = 16            # context splits per row (the kernel's default)
TARGET_PROGRAMS = 1024     # split the context until rows x KV heads x splits reach this (about 8 per H200 SM)


def native_platforms() -> tuple[str, ...]:
    return PLATFORMS


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def plan(batch: int, n_kv: int, group: int, pages_per_sequence: int, page_size: int) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block): split the context until the grid reaches ``TARGET_PROGRAMS`` programs
    (at most ``MAX_SPLITS``; a divisor of pages_per_sequence, as the kernel needs), blocks of at most
    ``MAX_PAGES_PER_BLOCK`` pages and ``MAX_BLOCK_TOKENS`` tokens (at least one page) dividing a split."""
    programs = batch * n_kv * -(-group // BLOCK_H)
    splits = _largest_divisor(pages_per_sequence, min(MAX_SPLITS, max(1, -(-TARGET_PROGRAMS // programs))))
    per_block = max(1, min(MAX_PAGES_PER_BLOCK, MAX_BLOCK_TOKENS // page_size))
    pages = _largest_divisor(pages_per_sequence // splits, per_block)
    return splits, pages


def unsupported(q, k_pages, page_indices) -> str | None:
    """Why the kernel cannot compute the call, or None."""
    d, page_size = q.shape[-1], k_pages.shape[2]
    if not _power_of_two(d) or d < 16:
        return f"needs a power-of-two head dim >= 16 (got {d})"
    _, pages = plan(q.shape[0], k_pages.shape[0], q.shape[1] // k_pages.shape[0], page_indices.shape[1], page_size)
    if not _power_of_two(page_size * pages) or page_size * pages < 16:
        return (f"needs page_size x pages per block to be a power of two >= 16 (page_size {page_size}, "
                f"{pages} pages per block)")
    return None


def paged_attention(q, k_pages, v_pages, lengths, page_indices, *, interpret: bool = False):
    """The api contract (q [B, H, D], pages [Hkv, N, page_size, D], lengths [B], page_indices [B, P] -> [B, H, D]);
    ``interpret``: Pallas interpret mode (CPU)."""
    with warnings.catch_warnings():  # jax points to tokamax, which this project does not require
        warnings.filterwarnings("ignore", message=".*paged_attention is deprecated")
        from jax.experimental.pallas.ops.gpu import paged_attention as gpu_paged  # noqa: PLC0415

    b, nh, d = q.shape
    n_kv = k_pages.shape[0]
    splits, pages = plan(b, n_kv, nh // n_kv, page_indices.shape[1], k_pages.shape[2])
    scaled = (q.astype(jnp.float32) / jnp.sqrt(jnp.float32(d))).astype(k_pages.dtype)
    out = gpu_paged.paged_attention(scaled, k_pages, v_pages.astype(k_pages.dtype), page_indices.astype(jnp.int32),
                                    lengths.astype(jnp.int32), block_h=BLOCK_H, pages_per_compute_block=pages,
                                    k_splits=splits, num_warps=NUM_WARPS,
                                    num_stages=NUM_STAGES, interpret=interpret)
    return out.astype(q.dtype)
