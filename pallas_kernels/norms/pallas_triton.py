"""RMSNorm (optionally gated) as Pallas kernels lowered through Triton (GPU), with a ``jax.custom_vjp`` backward.

XLA runs each of the model's RMSNorms as several kernels (three forward and four backward in a decoder layer: the
statistics, the normalisation, the row dot product, the weight gradient's column sum). Here:
- forward: one kernel, one read of x (and gate) and one write of the output; a program normalises ``block_rows``
  whole rows (D padded to a power of two and masked, so no operand needs padding);
- backward: one kernel that recomputes the statistics from x (cheaper than saving them: x is read anyway), writes
  dx (and the gate's gradient) and accumulates the weight gradient of its rows in fp32 registers; each of
  ``BACKWARD_PROGRAMS`` programs walks a contiguous run of row tiles and writes one partial [D] row, and XLA sums the
  few hundred partials (a reduction over a [P, D] array, negligible next to [N, D]).
The math and its rounding points are ``reference.rms_norm``'s.

Measured on an H200 (``benchmarks/norms.py``): the forward runs at 67-77% of the HBM floor, 0.96-1.12x XLA's
fusions; the backward's loop over row tiles keeps too few loads in flight at large D (one row of 4096-8192 columns
per iteration fills a program's registers), so forward + backward is 0.80-0.92x XLA's from D = 4096 up (1.06x at
1024). Software pipelining (``backward_stages``), more programs and other tile sizes did not change that. So the
API's default is XLA; this kernel is the starting point for a backward that keeps several rows in flight.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import pl, pltriton

@dataclasses.dataclass(frozen=True)
class Tiling:
    """How the kernels split [N, D] and run.

    tile_elements: elements of x a program holds per row tile (whole rows, D padded to a power of two): as many rows
      as fit, at least one.
    num_warps: warps per program; None = one per ``ELEMENTS_PER_WARP`` elements of the tile, 4 to 16 (several fp32
      copies of the tile live in registers in the backward: more elements per thread spill).
    backward_programs: programs of the backward, one partial weight-gradient row each: a few per SM on a Hopper card
      (132 SMs), so the row tiles spread evenly while the [P, D] partials stay small.
    backward_stages: software-pipelining stages of the backward's loop over its row tiles (2: the next tile's loads
      are issued before this tile's math).
    """
    tile_elements: int = 4096
    num_warps: int | None = None
    backward_programs: int = 512
    backward_stages: int = 1


ELEMENTS_PER_WARP = 512


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_shape(d: int, tiling: Tiling) -> tuple[int, int, int]:
    """(block_rows, block_d, num_warps) for rows of length d: whole rows (Triton tiles are powers of two, so D is
    padded and masked), as many rows as fill ``tiling.tile_elements``."""
    block_d = _next_power_of_2(d)
    block_rows = max(1, _next_power_of_2(tiling.tile_elements) // block_d)
    warps = tiling.num_warps or min(16, max(4, block_rows * block_d // ELEMENTS_PER_WARP))
    return block_rows, block_d, warps


def _row_tile(row0, block_rows, block_d, n, d):
    """Masks of the tile at row0: the [block_rows, block_d] element mask and the [block_d] column mask."""
    rows = row0 + lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
    cols = lax.broadcasted_iota(jnp.int32, (block_d,), 0)
    cols_ok = cols < d
    return (rows < n)[:, None] & cols_ok[None, :], cols_ok


def _load(ref, mask):
    return pltriton.load(ref, mask=mask, other=0).astype(jnp.float32)


def _normalised(x, d, eps):
    """x [R, Dp] fp32 (zero padded) -> (xhat, rstd [R, 1])."""
    rstd = lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / d + eps)
    return x * rstd, rstd


def _rounded(x, dtype):
    """x rounded to dtype and back to fp32: the value the reference multiplies with."""
    return x.astype(dtype).astype(jnp.float32)


def _forward_kernel(*refs, has_gate, n, d, eps, norm_dtype, block_rows, block_d):
    x_ref, w_ref, *gate_ref, out_ref = refs
    row0 = pl.program_id(0) * block_rows
    mask, cols_ok = _row_tile(row0, block_rows, block_d, n, d)
    tile = (pl.ds(row0, block_rows), pl.ds(0, block_d))
    xhat, _ = _normalised(_load(x_ref.at[tile], mask), d, eps)
    w = _rounded(_load(w_ref.at[pl.ds(0, block_d)], cols_ok), norm_dtype)
    y = _rounded(_rounded(xhat, norm_dtype) * w[None, :], norm_dtype)
    if has_gate:
        y = y * jax.nn.sigmoid(_load(gate_ref[0].at[tile], mask))
    pltriton.store(out_ref.at[tile], y.astype(out_ref.dtype), mask=mask)


def _backward_kernel(*refs, has_gate, n, d, eps, norm_dtype, block_rows, block_d, tiles_per_program):
    if has_gate:
        x_ref, w_ref, gate_ref, dout_ref, dx_ref, dgate_ref, dw_ref = refs
    else:
        (x_ref, w_ref, dout_ref, dx_ref, dw_ref), gate_ref, dgate_ref = refs, None, None
    pid = pl.program_id(0)
    cols_ok = lax.broadcasted_iota(jnp.int32, (block_d,), 0) < d
    w = _rounded(_load(w_ref.at[pl.ds(0, block_d)], cols_ok), norm_dtype)

    def tile_step(i, dw_acc):
        row0 = (pid * tiles_per_program + i) * block_rows
        mask, _ = _row_tile(row0, block_rows, block_d, n, d)
        tile = (pl.ds(row0, block_rows), pl.ds(0, block_d))
        xhat, rstd = _normalised(_load(x_ref.at[tile], mask), d, eps)
        a = _rounded(xhat, norm_dtype)
        dy = _load(dout_ref.at[tile], mask)  # rows and columns outside the array load 0, so they add nothing
        if has_gate:
            s = jax.nn.sigmoid(_load(gate_ref.at[tile], mask))
            y = _rounded(a * w[None, :], norm_dtype)
            pltriton.store(dgate_ref.at[tile], (dy * y * s * (1.0 - s)).astype(dgate_ref.dtype), mask=mask)
            dy = dy * s
        dxhat = dy * w[None, :]
        dx = rstd * (dxhat - xhat * (jnp.sum(dxhat * xhat, axis=1, keepdims=True) / d))
        pltriton.store(dx_ref.at[tile], dx.astype(dx_ref.dtype), mask=mask)
        return dw_acc + jnp.sum(dy * a, axis=0)

    dw = lax.fori_loop(0, tiles_per_program, tile_step, jnp.zeros((block_d,), jnp.float32))
    pltriton.store(dw_ref.at[pid, pl.ds(0, block_d)], dw, mask=cols_ok)


def _static(x, eps, norm_dtype, tiling):
    n, d = x.shape
    block_rows, block_d, num_warps = tile_shape(d, tiling)
    return dict(n=n, d=d, eps=float(eps), norm_dtype=jnp.dtype(norm_dtype), block_rows=block_rows,
                block_d=block_d), num_warps


def forward(x, weight, gate, eps, norm_dtype, out_dtype, tiling=Tiling(), interpret=False):
    """x [N, D], weight [D], gate [N, D] or None -> [N, D] out_dtype (no custom VJP: see ``rms_norm``)."""
    static, num_warps = _static(x, eps, norm_dtype, tiling)
    has_gate = gate is not None
    return pl.pallas_call(
        functools.partial(_forward_kernel, has_gate=has_gate, **static),
        out_shape=jax.ShapeDtypeStruct(x.shape, out_dtype),
        grid=(_cdiv(x.shape[0], static["block_rows"]),),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_fwd_triton",
    )(x, weight, *((gate,) if has_gate else ()))


def backward(x, weight, gate, dout, eps, norm_dtype, tiling=Tiling(), interpret=False):
    """Returns (dx [N, D] x.dtype, d_weight [D] weight.dtype, d_gate [N, D] gate.dtype or None)."""
    static, num_warps = _static(x, eps, norm_dtype, tiling)
    has_gate = gate is not None
    tiles = _cdiv(x.shape[0], static["block_rows"])
    tiles_per_program = _cdiv(tiles, tiling.backward_programs)
    programs = _cdiv(tiles, tiles_per_program)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if has_gate:
        out_shape.append(jax.ShapeDtypeStruct(gate.shape, gate.dtype))
    out_shape.append(jax.ShapeDtypeStruct((programs, x.shape[1]), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, has_gate=has_gate, tiles_per_program=tiles_per_program, **static),
        out_shape=tuple(out_shape),
        grid=(programs,),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=tiling.backward_stages),
        interpret=interpret,
        name="rms_norm_bwd_triton",
    )(x, weight, *((gate,) if has_gate else ()), dout)
    dx, dw_partials = outs[0], outs[-1]
    return dx, jnp.sum(dw_partials, axis=0).astype(weight.dtype), (outs[1] if has_gate else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def rms_norm(x, weight, gate, eps, norm_dtype, out_dtype, tiling: Tiling, interpret: bool):
    """Differentiable x [N, D], weight [D], gate [N, D] or None -> [N, D] (see ``reference.rms_norm``)."""
    return forward(x, weight, gate, eps, norm_dtype, out_dtype, tiling, interpret)


def _rms_norm_fwd(x, weight, gate, eps, norm_dtype, out_dtype, tiling, interpret):
    return forward(x, weight, gate, eps, norm_dtype, out_dtype, tiling, interpret), (x, weight, gate)


def _rms_norm_bwd(eps, norm_dtype, out_dtype, tiling, interpret, residuals, dout):
    del out_dtype
    x, weight, gate = residuals
    return backward(x, weight, gate, dout, eps, norm_dtype, tiling, interpret)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
