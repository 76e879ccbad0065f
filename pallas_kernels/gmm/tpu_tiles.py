"""Megablox tiles that fit the scoped VMEM of the TPU generation being compiled for.

megablox runs three kernels per grouped matmul and its gradient, each over a ``(tm, tk, tn)`` tile: the forward
``gmm`` (lhs [tm, tk] x rhs [tk, tn] into an fp32 [tm, tn] accumulator), the d_lhs ``gmm`` (the same with k and n
swapped, rhs transposed) and the weight gradient ``tgmm`` (lhs^T [tk, tm] x dout [tm, tn] into an fp32 [tk, tn]
accumulator). Each keeps its input and output blocks double-buffered in VMEM, so a tile needs

    gmm:  2 (tm tk + tk tn) in_bytes + tm tn (2 out_bytes + 4)
    tgmm: 2 (tk tm + tm tn) in_bytes + tk tn (2 out_bytes + 4)

bytes (``vmem_bytes``; this is the size the TPU compiler reports when a tile exceeds the limit). ``fit`` takes the
largest tile that fits the generation's limit (``platform.tpu_scoped_vmem_bytes``) with ``HEADROOM`` to spare:
``tm = TM`` rows (a group boundary inside a row tile costs a partial tile, so rows stay moderate), then the
``(tk, tn)`` pair with the largest smaller side, then the largest area, from the multiples of 128 dividing k and n
(Mosaic's lane width; a dim below 128 is taken whole). On M1's expert matmuls (K, N = 6144, 9216) this is
(512, 1024, 1024) on v5e and v5p (16 MiB) and (512, 2048, 1024) for the up projection on v6e (32 MiB).
"""
from __future__ import annotations

import dataclasses

TM = 512                                 # rows per tile
SIZES = (2048, 1024, 512, 256, 128)      # tk, tn candidates (multiples of Mosaic's 128 lanes)
HEADROOM = 2 * 2 ** 20                   # VMEM left for the kernels' own scratch


def vmem_bytes(tm: int, tk: int, tn: int, in_bytes: int, out_bytes: int) -> int:
    """Scoped VMEM of megablox's kernels on one tile: the larger of gmm's and tgmm's (module docstring)."""
    gmm = 2 * (tm * tk + tk * tn) * in_bytes + tm * tn * (2 * out_bytes + 4)
    tgmm = 2 * (tk * tm + tm * tn) * in_bytes + tk * tn * (2 * out_bytes + 4)
    return max(gmm, tgmm)


def candidates(dim: int) -> tuple[int, ...]:
    """Tile sizes along a contraction/output dim: the ``SIZES`` dividing it, or the whole dim below 128."""
    return (dim,) if dim < 128 else tuple(s for s in SIZES if dim % s == 0)


def fit(m: int, k: int, n: int, in_bytes: int, out_bytes: int, vmem_limit: int) -> tuple[int, int, int] | None:
    """(tm, tk, tn) for an [m, k] x [G, k, n] grouped matmul, or None when k or n has no tile (not a multiple of 128
    and not below it). tm = min(TM, m): the caller pads m to a multiple of it; when no (tk, tn) fits at TM rows,
    256 and 128 are tried, then the smallest tile is returned (and the compiler will say it does not fit)."""
    ks, ns = candidates(k), candidates(n)
    if not ks or not ns:
        return None
    rows = [min(TM, m)] + ([256, 128] if m >= TM else [])
    for tm in rows:
        fitting = [(tk, tn) for tk in ks for tn in ns
                   if vmem_bytes(tm, tk, tn, in_bytes, out_bytes) + HEADROOM <= vmem_limit]
        if fitting:
            tk, tn = max(fitting, key=lambda t: (min(t), t[0] * t[1], t[0]))
            return tm, tk, tn
    return rows[-1], ks[-1], ns[-1]


@dataclasses.dataclass(frozen=True)
class MegabloxTiling:
    """megablox's ``tiling`` lookup: called with each kernel's (m, k, n) (the d_lhs kernel's k and n are the forward's
    n and k), returns ``fit``'s tile. Hashable (megablox passes it as a static argument)."""
    vmem_limit: int
    in_bytes: int
    out_bytes: int

    def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int] | None:
        return fit(m, k, n, self.in_bytes, self.out_bytes, self.vmem_limit)
