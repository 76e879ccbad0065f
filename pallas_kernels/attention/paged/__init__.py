"""Attention over a paged KV cache: one-token decode (flash decoding) and a prefill chunk of one sequence.

``paged_attention(q [B, H, D], k_pages, v_pages [Hkv, total_pages, page_size, D], lengths [B], page_indices
[B, pages_per_sequence], *, implementation=None) -> [B, H, D]`` and ``paged_prefill_attention(q [T, H, D], k_pages,
v_pages, start, page_indices [pages_per_sequence], *, implementation=None) -> [T, H, D]``; see ``api``.
"""
from pallas_kernels.attention.paged.api import (IMPLEMENTATIONS, default_implementation, paged_attention,
                                                paged_prefill_attention)

__all__ = ["IMPLEMENTATIONS", "default_implementation", "paged_attention", "paged_prefill_attention"]
