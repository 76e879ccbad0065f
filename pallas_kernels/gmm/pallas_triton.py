"""Grouped matmul as Pallas kernels lowered through Triton (GPU), with a ``jax.custom_vjp`` backward.

Three kernels, all with a 1-D grid (Triton programs run in parallel, so no kernel carries state across them):
- ``gmm``: ``out[M, N] = lhs[M, K] @ rhs[g]`` per row group, one program per (row-tile visit, column tile);
  with ``transpose_rhs`` it multiplies by ``rhs[g].T`` instead (the d_lhs kernel, no transposed copy of rhs).
- ``tgmm``: ``out[g] = lhs[rows of g].T @ dout[rows of g]`` -> [G, K, N] (the d_rhs kernel), one program per
  (group, K tile, N tile), looping over the group's rows.
Mixed precision: rhs may be wider than lhs (the MoE's fp32 master weights with bf16 rows). The forward multiplies by
``rhs.astype(lhs.dtype)`` (one cast, whose result the backward's d_lhs kernel reads again), and ``tgmm`` writes d_rhs
in rhs's dtype straight from its fp32 accumulator: no bf16 rounding of the weight gradient and no cast pass after
it. (Rounding the fp32 tiles inside ``gmm`` instead, which would also save the forward's cast, halved the kernels'
speed on an H200: Triton then stages fp32 tiles and converts them in registers before each dot.)
Rows are addressed with dynamic offsets read from small int32 tables (``schedule.py``); out-of-range rows, K and
N columns are masked at load (to zero) and at store, so no operand needs padding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import pl, pltriton
from pallas_kernels.gmm import schedule
from pallas_kernels.gmm.tiling import TileConfig, Tiling


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _masked_load(ref, rows_ok, cols_ok):
    """Loads a 2-D block view, zero where rows_ok[:, None] & cols_ok[None, :] is False (None = all valid)."""
    mask = None
    for ok, expand in ((rows_ok, (slice(None), None)), (cols_ok, (None, slice(None)))):
        if ok is not None:
            mask = ok[expand] if mask is None else mask & ok[expand]
    if mask is None:
        return ref[...]
    return pltriton.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=0)


def _gmm_kernel(visits_ref, lhs_ref, rhs_ref, out_ref, *, tile: TileConfig, num_visits: int, num_groups: int,
                m: int, k: int, n: int, transpose_rhs: bool):
    bm, bk, bn = tile.block_m, tile.block_k, tile.block_n
    tiles_n = _cdiv(n, bn)
    # Swizzle: consecutive programs sweep group_m row tiles for one column tile, then the next column tile,
    # so each weight column strip is fetched from HBM once per group_m row tiles (they share it through L2).
    pid = pl.program_id(0)
    per_band = tile.group_m * tiles_n
    first_visit = (pid // per_band) * tile.group_m
    band_rows = jnp.minimum(num_visits - first_visit, tile.group_m)
    visit = first_visit + (pid % per_band) % band_rows
    n_tile = (pid % per_band) // band_rows

    group = visits_ref[visit, schedule.GROUP]
    row0 = visits_ref[visit, schedule.ROW_TILE] * bm
    lo, hi = visits_ref[visit, schedule.ROW_LO], visits_ref[visit, schedule.ROW_HI]
    col0 = n_tile * bn
    rows = row0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)
    cols = col0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)
    rows_in_lhs = rows < m if m % bm else None
    cols_ok = cols < n if n % bn else None
    out_view = out_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)]
    store_mask = ((rows >= lo) & (rows < hi))[:, None]
    if cols_ok is not None:
        store_mask = store_mask & cols_ok[None, :]
    store_mask = jnp.broadcast_to(store_mask, (bm, bn))

    @pl.when((group >= 0) & (group < num_groups))
    def _matmul():
        def body(step, acc):
            k0 = pl.multiple_of(step * bk, bk)
            ks = k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
            ks_ok = ks < k if k % bk else None
            a = _masked_load(lhs_ref.at[pl.ds(row0, bm), pl.ds(k0, bk)], rows_in_lhs, ks_ok)
            if transpose_rhs:   # rhs[g] is [N, K]: contract both operands' last dimension
                b = _masked_load(rhs_ref.at[group, pl.ds(col0, bn), pl.ds(k0, bk)], cols_ok, ks_ok)
                return acc + lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            b = _masked_load(rhs_ref.at[group, pl.ds(k0, bk), pl.ds(col0, bn)], ks_ok, cols_ok)
            return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, _cdiv(k, bk), body, jnp.zeros((bm, bn), jnp.float32))
        pltriton.store(out_view, acc.astype(out_ref.dtype), mask=store_mask)

    @pl.when(group == num_groups)
    def _zero_tail():  # rows past sum(group_sizes)
        pltriton.store(out_view, jnp.zeros((bm, bn), out_ref.dtype), mask=store_mask)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype, tile: TileConfig,
        transpose_rhs: bool = False, interpret: bool = False) -> jax.Array:
    """[M, K] x [G, K, N] (or [G, N, K] with transpose_rhs) -> [M, N] in out_dtype; no autodiff."""
    m, k = lhs.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tile = tile.fit(m, n, k)
    visits = schedule.row_tile_visits(group_sizes, m, tile.block_m)
    num_visits = visits.shape[0]
    kernel = functools.partial(_gmm_kernel, tile=tile, num_visits=num_visits, num_groups=num_groups,
                               m=m, k=k, n=n, transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(num_visits * _cdiv(n, tile.block_n),),
        compiler_params=pltriton.CompilerParams(num_warps=tile.num_warps, num_stages=tile.num_stages),
        interpret=interpret,
        name="gmm_triton_transposed_rhs" if transpose_rhs else "gmm_triton",
    )(visits, lhs, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, tile: TileConfig, m: int, k: int, n: int):
    bm, bk, bn = tile.block_m, tile.block_k, tile.block_n
    tiles_k, tiles_n = _cdiv(k, bk), _cdiv(n, bn)
    # Group slowest: the programs of one group run together and share its lhs and dout rows through L2.
    pid = pl.program_id(0)
    group = pid // (tiles_k * tiles_n)
    k0 = ((pid // tiles_n) % tiles_k) * bk
    n0 = (pid % tiles_n) * bn
    lo, hi = offsets_ref[group], offsets_ref[group + 1]
    ks = k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    ns = n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0)
    ks_ok = ks < k if k % bk else None
    ns_ok = ns < n if n % bn else None

    def body(step, acc):
        r0 = lo + step * bm
        rows_ok = r0 + lax.broadcasted_iota(jnp.int32, (bm,), 0) < hi  # other groups' rows must not leak in
        x = _masked_load(lhs_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], rows_ok, ks_ok)
        dy = _masked_load(dout_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], rows_ok, ns_ok)
        return acc + lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    # An empty group runs no step and writes zeros, its correct gradient.
    acc = lax.fori_loop(0, (hi - lo + bm - 1) // bm, body, jnp.zeros((bk, bn), jnp.float32))
    mask = None
    if ks_ok is not None or ns_ok is not None:
        mask = jnp.broadcast_to((True if ks_ok is None else ks_ok[:, None]) &
                                (True if ns_ok is None else ns_ok[None, :]), (bk, bn))
    pltriton.store(out_ref.at[group, pl.ds(k0, bk), pl.ds(n0, bn)], acc.astype(out_ref.dtype), mask=mask)


def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, out_dtype, tile: TileConfig,
         interpret: bool = False) -> jax.Array:
    """[M, K], [M, N] -> [G, K, N]: per-group ``lhs.T @ dout`` over the group's rows; no autodiff."""
    m, k = lhs.shape
    n = dout.shape[1]
    num_groups = group_sizes.shape[0]
    tile = tile.fit(m, n, k)
    offsets = schedule.group_offsets(group_sizes, m)
    kernel = functools.partial(_tgmm_kernel, tile=tile, m=m, k=k, n=n)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(num_groups * _cdiv(k, tile.block_k) * _cdiv(n, tile.block_n),),
        compiler_params=pltriton.CompilerParams(num_warps=tile.num_warps, num_stages=tile.num_stages),
        interpret=interpret,
        name="tgmm_triton",
    )(offsets, lhs, dout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def grouped_matmul(lhs, rhs, group_sizes, out_dtype, tiling: Tiling, interpret: bool):
    """Differentiable [M, K] x [G, K, N] -> [M, N] (see api.grouped_matmul). rhs may be wider than lhs: it is
    multiplied in lhs's dtype, and d_rhs comes back in rhs's dtype from tgmm's fp32 accumulator."""
    return _grouped_matmul_fwd(lhs, rhs, group_sizes, out_dtype, tiling, interpret)[0]


def _grouped_matmul_fwd(lhs, rhs, group_sizes, out_dtype, tiling, interpret):
    rhs_product = rhs.astype(lhs.dtype)  # the weights as multiplied, kept for d_lhs (a no-op for equal dtypes)
    out = gmm(lhs, rhs_product, group_sizes, out_dtype=out_dtype, tile=tiling.fwd, interpret=interpret)
    return out, (lhs, rhs_product, group_sizes, jnp.zeros((), rhs.dtype))  # the last: rhs's dtype, for d_rhs


def _grouped_matmul_bwd(out_dtype, tiling, interpret, residuals, dout):
    del out_dtype
    lhs, rhs_product, group_sizes, rhs_dtype_of = residuals
    dout = dout.astype(lhs.dtype)  # Triton's dot takes one operand dtype: the product's, lhs's
    # Rows outside every group got a constant zero, so their cotangents drop out: d_lhs rows there are zero
    # (the zero-tail visits) and tgmm never reads them.
    d_lhs = gmm(dout, rhs_product, group_sizes, out_dtype=lhs.dtype, tile=tiling.dlhs, transpose_rhs=True,
                interpret=interpret)
    d_rhs = tgmm(lhs, dout, group_sizes, out_dtype=rhs_dtype_of.dtype, tile=tiling.drhs, interpret=interpret)
    return d_lhs, d_rhs, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
