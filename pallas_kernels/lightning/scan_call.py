"""The ``pallas_call`` that the Triton and TPU lightning scans share: the kernel's static arguments, the outputs (o
when the walk has one, then the final state) and the kernel's name. Each backend brings its grid, BlockSpecs and
compiler params."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.compat import pl
from pallas_kernels.lightning import chunk_math
from pallas_kernels.lightning.config import RowLayout


def scan_pallas_call(kernel, args, in_specs, *, grid, layout: RowLayout, chunk: int, reverse: bool,
                     with_output: bool, has_init: bool, has_doc: bool, operand_dtype, o_shape: tuple, o_dtype, o_spec,
                     state_shape: tuple, state_spec, interpret: bool, **backend_params):
    """Run ``kernel`` (a backend's ``_kernel``: its refs, then ``layout``, ``chunk``, ``reverse``, ``with_output``,
    ``has_init``, ``has_doc`` and ``precision`` as keywords) over ``grid`` on ``args``.

    ``operand_dtype`` (k's) sets the kernel's matmul precision. Outputs: o ``o_shape`` in ``o_dtype`` (``o_spec``)
    when ``with_output``, and the final state ``state_shape`` float32 (``state_spec``). ``backend_params``: the rest
    of ``pl.pallas_call``'s arguments (compiler params, scratch). Returns (o or None, state).
    """
    out_shape = [jax.ShapeDtypeStruct(state_shape, jnp.float32)]
    out_specs = [state_spec]
    if with_output:
        out_shape.insert(0, jax.ShapeDtypeStruct(o_shape, o_dtype))
        out_specs.insert(0, o_spec)
    kernel = functools.partial(kernel, layout=layout, chunk=chunk, reverse=reverse, with_output=with_output,
                               has_init=has_init, has_doc=has_doc, precision=chunk_math.matmul_precision(operand_dtype))
    outs = pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        name=f"lightning_{'rev' if reverse else 'fwd'}{'' if with_output else '_state'}", **backend_params,
    )(*args)
    return (outs[0], outs[1]) if with_output else (None, outs[0])
