"""Softmax attention: ``attention(q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh], mask: Mask) -> [B, Tq, H, Dh]``."""
from pallas_kernels.attention.api import IMPLEMENTATIONS, attention, default_implementation
from pallas_kernels.attention.mask import Mask, slot_mask

__all__ = ["IMPLEMENTATIONS", "Mask", "attention", "default_implementation", "slot_mask"]
