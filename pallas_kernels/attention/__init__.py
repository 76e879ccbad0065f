"""Softmax attention: ``attention(q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh], mask: Mask) -> [B, Tq, H, Dh]``, and
over a paged KV cache (``paged``): ``paged_attention`` (decode) and ``paged_prefill_attention``."""
from pallas_kernels.attention.api import IMPLEMENTATIONS, attention, default_implementation
from pallas_kernels.attention.mask import Mask, slot_mask
from pallas_kernels.attention.paged import paged_attention, paged_prefill_attention

__all__ = ["IMPLEMENTATIONS", "Mask", "attention", "default_implementation", "paged_attention",
           "paged_prefill_attention", "slot_mask"]
