"""RMSNorm with float32 statistics, optionally with a sigmoid gate: ``rms_norm(x [..., D], weight [D]) -> [..., D]``."""
from pallas_kernels.norms.api import IMPLEMENTATIONS, default_implementation, rms_norm
from pallas_kernels.norms.pallas_triton import Tiling

__all__ = ["IMPLEMENTATIONS", "Tiling", "default_implementation", "rms_norm"]
