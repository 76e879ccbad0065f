"""Grouped matmul for the MoE layers: ``grouped_matmul(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]``."""
from pallas_kernels.gmm.api import IMPLEMENTATIONS, default_implementation, grouped_matmul
from pallas_kernels.gmm.tiling import TileConfig, Tiling

__all__ = ["IMPLEMENTATIONS", "TileConfig", "Tiling", "default_implementation", "grouped_matmul"]
