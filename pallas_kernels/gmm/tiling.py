"""Tile sizes of the Pallas-Triton grouped matmul, one set per kernel (forward, d_lhs, d_rhs)."""
from __future__ import annotations

import dataclasses


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One kernel's tile: a ``[block_m, block_n]`` output tile reduced over ``block_k`` slices.

    For the transposed kernel (d_rhs, output ``[G, K, N]``) ``block_m`` is the reduction step over the
    group's rows and the output tile is ``[block_k, block_n]``.

    group_m: forward/d_lhs only: how many consecutive row tiles share one sweep over the column tiles, so
      that a column strip of the weights is read from HBM once per ``group_m`` row tiles (L2 reuse).
    num_warps, num_stages: Triton launch parameters (warps per program, software-pipelining depth).
    """

    block_m: int = 128
    block_k: int = 64
    block_n: int = 256
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_k", "block_n"):
            value = getattr(self, name)
            # Triton needs power-of-two blocks, and its dot at least 16 along each dimension.
            if not _is_power_of_two(value) or value < 16:
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16; got {value}")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"group_m, num_warps and num_stages must be >= 1; got {self}")

    def fit(self, rows: int, cols: int, depth: int) -> TileConfig:
        """Shrinks blocks that exceed a small problem (rows/cols/depth = M, N, K of this kernel)."""
        def clamp(block, dim):
            return max(16, min(block, 1 << max(dim - 1, 0).bit_length()))
        return dataclasses.replace(self, block_m=clamp(self.block_m, rows), block_n=clamp(self.block_n, cols),
                                   block_k=clamp(self.block_k, depth))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tiles for the three kernels of one grouped matmul and its gradient.

    The defaults are the fastest of experiments/bench_moe.py's grid on an H100 at the MiniMax MoE shapes
    (benchmarks/RESULTS.md, "Grouped matmul"); 3 stages of a 128x256 tile use 144 KB of shared memory.
    """

    fwd: TileConfig = TileConfig()
    dlhs: TileConfig = TileConfig()
    drhs: TileConfig = TileConfig(block_m=64, block_k=128, block_n=256)

    @classmethod
    def uniform(cls, tile: TileConfig) -> Tiling:
        return cls(fwd=tile, dlhs=tile, drhs=tile)
