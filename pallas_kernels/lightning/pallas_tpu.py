"""Lightning scan on TPU: Mosaic ``pallas_call`` with the chunk axis as a sequential ("arbitrary") grid axis.

Grid ``(rows, H, chunks)``: the chunk axis runs in order on one core, so the float32 ``[Dk, Dv]`` state lives in a
VMEM scratch buffer across grid steps and never reaches HBM; Mosaic pipelines the next chunk's q/k/v DMA behind the
current step. The step body is ``chunk_math.walk_step``, shared with the Triton kernel.

Mosaic wants the last two block dims divisible by (8, 128) or equal to the array's: with ``D % 128 == 0`` the
``[R, L, H, D]`` arrays are viewed (free reshape) as ``[R, L, H*D]`` and a block is one head's ``[C, D]`` slab;
otherwise they are transposed to ``[R, H, L, D]`` (one extra HBM pass). The chunk must be a multiple of 128 when
segment ids are used (their ``[1, C]`` row block), or the whole row.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.compat import pl, pltpu
from pallas_kernels.lightning import chunk_math
from pallas_kernels.lightning.config import KernelConfig, RowLayout
from pallas_kernels.lightning.scan_call import scan_pallas_call


def _kernel(*refs, layout: RowLayout, chunk: int, reverse: bool, with_output: bool, has_init: bool,
            has_doc: bool, precision):
    refs = list(refs)
    s_ref = refs.pop(0)
    q_ref = refs.pop(0) if with_output else None
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    doc_col_ref, doc_row_ref = (refs.pop(0), refs.pop(0)) if has_doc else (None, None)
    init_ref = refs.pop(0) if has_init else None
    o_ref = refs.pop(0) if with_output else None
    state_ref, state_scratch, doc_scratch = refs

    n_chunks = layout.length // chunk
    step = pl.program_id(2)
    c = (n_chunks - 1 - step) if reverse else step

    @pl.when(step == 0)
    def _start():
        state_scratch[...] = init_ref[...] if has_init else jnp.zeros(state_scratch.shape, jnp.float32)
        doc_scratch[...] = jnp.zeros(doc_scratch.shape, jnp.int32)

    s = s_ref[pl.program_id(1)]
    geo = chunk_math.chunk_geometry(layout.row_valid(pl.program_id(0)) - c * chunk, chunk)
    doc_col = doc_col_ref[...] if has_doc else None
    doc_row = doc_row_ref[...] if has_doc else None
    q = q_ref[...] if with_output else None
    decay_cc = chunk_math.intra_decay(s, chunk, reverse) if with_output else None
    o, state, doc_end = chunk_math.walk_step(q, k_ref[...], v_ref[...], state_scratch[...], geo, s, decay_cc,
                                             reverse=reverse, precision=precision, doc_col=doc_col,
                                             doc_row=doc_row, doc_prev=doc_scratch[...] if has_doc else None)
    if with_output:
        o_ref[...] = o.astype(o_ref.dtype)
    state_scratch[...] = state
    if has_doc:
        doc_scratch[...] = doc_end

    @pl.when(step == n_chunks - 1)
    def _finish():
        state_ref[...] = state_scratch[...]


def _seq_operand(x, chunk: int, n_chunks: int, reverse: bool):
    """(operand, BlockSpec, restore) for a [R, L, H, D] array: one head's [C, D] chunk per grid step."""
    rows, length, heads, dim = x.shape
    chunk_of = (lambda c: n_chunks - 1 - c) if reverse else (lambda c: c)
    if dim % 128 == 0 or heads == 1:
        spec = pl.BlockSpec((None, chunk, dim), lambda r, h, c: (r, chunk_of(c), h))
        return x.reshape(rows, length, heads * dim), spec, lambda y: y.reshape(rows, length, heads, -1)
    spec = pl.BlockSpec((None, None, chunk, dim), lambda r, h, c: (r, h, chunk_of(c), 0))
    return jnp.swapaxes(x, 1, 2), spec, lambda y: jnp.swapaxes(y, 1, 2)


def chunk_scan(q, k, v, s, init, doc, *, layout: RowLayout, reverse: bool, with_output: bool,
               config: KernelConfig, interpret: bool = False):
    """Same contract as ``pallas_triton.chunk_scan`` (``config.block_v`` is ignored: the state is one VMEM tile)."""
    rows, length, heads, dk = k.shape
    dv = v.shape[-1]
    chunk = config.chunk
    if length % chunk:
        raise ValueError(f"L={length} must be a multiple of the chunk {chunk}")
    n_chunks = length // chunk
    grid = (rows, heads, n_chunks)
    chunk_of = (lambda c: n_chunks - 1 - c) if reverse else (lambda c: c)
    in_specs, args = [pl.BlockSpec(memory_space=pltpu.SMEM)], [s]
    for x in ([q, k] if with_output else [k]):
        x_op, spec, _ = _seq_operand(x, chunk, n_chunks, reverse)
        in_specs.append(spec), args.append(x_op)
    v_op, v_spec, restore_o = _seq_operand(v, chunk, n_chunks, reverse)
    in_specs.append(v_spec), args.append(v_op)
    if doc is not None:
        in_specs += [pl.BlockSpec((None, chunk, 1), lambda r, h, c: (r, chunk_of(c), 0)),
                     pl.BlockSpec((None, 1, chunk), lambda r, h, c: (r, 0, chunk_of(c)))]
        args += [doc[:, :, None], doc[:, None, :]]
    state_spec = pl.BlockSpec((None, None, dk, dv), lambda r, h, c: (r, h, 0, 0))
    if init is not None:
        in_specs.append(state_spec), args.append(init)
    o, state = scan_pallas_call(
        _kernel, args, in_specs, grid=grid, layout=layout, chunk=chunk, reverse=reverse, with_output=with_output,
        has_init=init is not None, has_doc=doc is not None, operand_dtype=k.dtype,
        o_shape=v_op.shape, o_dtype=v.dtype, o_spec=v_spec,
        state_shape=(rows, heads, dk, dv), state_spec=state_spec, interpret=interpret,
        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32), pltpu.VMEM((1, 1), jnp.int32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")))
    return (restore_o(o) if with_output else None), state
