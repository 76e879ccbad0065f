"""Lightning scan on GPU: one Triton-lowered ``pallas_call`` that keeps the state on chip for a whole row.

Grid ``(Dv / block_v, H, rows)``: each program owns one (Dv tile, head, row), walks the row's chunks in a loop
(forward or reverse) and carries its ``[Dk, block_v]`` float32 state in registers, so chunk states never touch HBM.
The Dv tiles of one (row, head) are adjacent in launch order (CUDA schedules x fastest), so they run together and
their repeated q/k reads hit L2. The loop body is ``chunk_math``; this module owns the grid, the BlockSpecs and the
compiler params.
Triton needs power-of-two block dims: ``Dk``, ``block_v`` and the chunk size must be powers of two (>= 16 on a GPU).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.compat import pl, pltriton
from pallas_kernels.lightning import chunk_math
from pallas_kernels.lightning.config import KernelConfig, RowLayout
from pallas_kernels.lightning.scan_call import scan_pallas_call


def _kernel(*refs, layout: RowLayout, chunk: int, reverse: bool, with_output: bool, has_init: bool,
            has_doc: bool, precision):
    refs = list(refs)
    s_ref = refs.pop(0)
    q_ref = refs.pop(0) if with_output else None
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    doc_ref = refs.pop(0) if has_doc else None
    init_ref = refs.pop(0) if has_init else None
    o_ref = refs.pop(0) if with_output else None
    state_ref, = refs

    s = s_ref[...].reshape(1, 1)
    n_valid = layout.row_valid(pl.program_id(2))
    n_chunks = layout.length // chunk
    decay_cc = chunk_math.intra_decay(s, chunk, reverse) if with_output else None
    state0 = (init_ref[...] if has_init else jnp.zeros(state_ref.shape, jnp.float32))

    def body(step, carry):
        state, doc_prev = carry
        c = (n_chunks - 1 - step) if reverse else step
        rows = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        geo = chunk_math.chunk_geometry(n_valid - c * chunk, chunk)
        k, v = k_ref[rows, :], v_ref[rows, :]
        doc_col = doc_row = None
        if has_doc:
            doc = doc_ref[rows]
            doc_col, doc_row = doc.reshape(chunk, 1), doc.reshape(1, chunk)
        q = q_ref[rows, :] if with_output else None
        o, state, doc_end = chunk_math.walk_step(q, k, v, state, geo, s, decay_cc, reverse=reverse,
                                                 precision=precision, doc_col=doc_col, doc_row=doc_row,
                                                 doc_prev=doc_prev)
        if with_output:
            o_ref[rows, :] = o.astype(o_ref.dtype)
        return state, (doc_end if has_doc else doc_prev)

    state, _ = lax.fori_loop(0, n_chunks, body, (state0, jnp.zeros((1, 1), jnp.int32)))
    state_ref[...] = state


def chunk_scan(q, k, v, s, init, doc, *, layout: RowLayout, reverse: bool, with_output: bool,
               config: KernelConfig, interpret: bool = False):
    """Walk every row of ``k, v`` (and ``q`` when ``with_output``) chunk by chunk.

    Args:
      q, k: [R, L, H, Dk]; v: [R, L, H, Dv]; L a multiple of ``config.chunk``; row r has ``layout.row_valid(r)`` valid
        tokens (the rest is zero padding).
      s: [H] float32 decay rates. init: [R, H, Dk, Dv] float32 or None (zeros). doc: [R, L] int32 (see chunk_math) or None.
    Returns:
      (o [R, L, H, Dv] in v's dtype or None, state [R, H, Dk, Dv] float32).
    """
    rows, length, heads, dk = k.shape
    dv = v.shape[-1]
    chunk = config.chunk
    block_v = min(config.block_v, dv)
    if dv % block_v or length % chunk:
        raise ValueError(f"Dv={dv} must be a multiple of block_v={block_v} and L={length} of the chunk {chunk}")
    grid = (dv // block_v, heads, rows)
    seq_k = pl.BlockSpec((None, length, None, dk), lambda j, h, r: (r, 0, h, 0))
    seq_v = pl.BlockSpec((None, length, None, block_v), lambda j, h, r: (r, 0, h, j))
    state_spec = pl.BlockSpec((None, None, dk, block_v), lambda j, h, r: (r, h, 0, j))
    in_specs, args = [pl.BlockSpec((1,), lambda j, h, r: (h,))], [s]
    if with_output:
        in_specs.append(seq_k), args.append(q)
    in_specs += [seq_k, seq_v]
    args += [k, v]
    if doc is not None:
        in_specs.append(pl.BlockSpec((None, length), lambda j, h, r: (r, 0))), args.append(doc)
    if init is not None:
        in_specs.append(state_spec), args.append(init)
    return scan_pallas_call(
        _kernel, args, in_specs, grid=grid, layout=layout, chunk=chunk, reverse=reverse, with_output=with_output,
        has_init=init is not None, has_doc=doc is not None, operand_dtype=k.dtype,
        o_shape=v.shape, o_dtype=v.dtype, o_spec=seq_v,
        state_shape=(rows, heads, dk, dv), state_spec=state_spec, interpret=interpret,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages))
