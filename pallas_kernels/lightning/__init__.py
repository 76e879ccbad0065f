"""Lightning attention: ``lightning_attention`` (prefill/training) and ``lightning_decode`` (one token)."""
from pallas_kernels.lightning.api import lightning_attention, lightning_decode

__all__ = ["lightning_attention", "lightning_decode"]
