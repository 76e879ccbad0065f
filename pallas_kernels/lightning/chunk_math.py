"""One chunk of the lightning scan, written on values so that the Triton and TPU kernels share it.

The kernels walk a row of ``L`` tokens chunk by chunk (``C`` tokens each), forward in time or in reverse, carrying a
float32 state ``[Dk, Dv]``. The same walk serves the forward pass and all three gradients (see ``ops.py``):

    forward:  o_i  = sum_{j<=i, same doc} exp(-s (i-j)) (q_i . k_j) v_j  +  exp(-s (i-a)) q_i S        (j, i in chunk)
              S'   = exp(-s (b-a)) S  +  sum_{j, same doc as the chunk end} exp(-s (b-j)) k_j^T v_j
    reverse:  o_j  = sum_{i>=j, same doc} exp(-s (i-j)) (q_j . k_i) v_i  +  exp(-s (b-j)) q_j S
              S'   = exp(-s (b-a)) S  +  sum_{i, same doc as the chunk start} exp(-s (i-a)) k_i^T v_i

``a`` and ``b`` are where the state sits before and after the chunk, relative to the chunk's first token:
the forward walk moves it from ``a`` to ``b``, the reverse walk from ``b`` back to ``a``. With ``limit`` valid tokens
left in the row (tokens at ``i >= limit`` are padding), ``a = min(limit, 0) - 1`` and ``b = min(limit, C) - 1``:
full chunks move the state by ``C`` steps, the last partial chunk stops at the last valid token, and chunks wholly in
the padding leave it where it is. So the reverse walk's input state sits on the row's last valid token (that is where
the gradient of the forward final state enters) and its output sits one step before the row (the gradient of the
forward initial state), with no correction outside.

Documents (packed sequences): ``doc`` is the running document number of each token, shifted so the row's first
processed token has document 0. The state carried into a chunk belongs to document ``doc_prev`` (the document of the
last token processed); a token sees it only in that document; the chunk's own tokens enter the outgoing state only if
they belong to the document the walk ends the chunk in.

All arrays are 2-D (``[C, 1]`` columns, ``[1, C]`` rows) because Mosaic TPU wants 2-D vector shapes. ``s`` is the
head's decay rate, a scalar or a ``[1, 1]`` array.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class ChunkGeometry:
    """Where the state sits around one chunk. ``a``, ``b``: int scalars (see module docstring); ``valid``: [C, 1]."""
    a: jax.Array
    b: jax.Array
    valid_col: jax.Array
    valid_row: jax.Array


def chunk_geometry(limit, chunk: int) -> ChunkGeometry:
    """``limit``: valid tokens left in the row from this chunk's start (may be <= 0 or > C)."""
    a = jnp.minimum(limit, 0) - 1
    b = jnp.minimum(limit, chunk) - 1
    col = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
    row = lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    return ChunkGeometry(a=a, b=b, valid_col=col < limit, valid_row=row < limit)


def intra_decay(s, chunk: int, reverse: bool) -> jax.Array:
    """[C, C] float32: exp(-s |i-j|) where token j feeds token i in the walk's direction, else 0 (loop invariant)."""
    i = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    j = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    dist = (j - i) if reverse else (i - j)
    return jnp.where(dist >= 0, jnp.exp(-s * jnp.maximum(dist, 0).astype(jnp.float32)), 0.0)


def _dot(x, y, precision, contract_lhs: int = 1, contract_rhs: int = 0):
    return lax.dot_general(x, y, (((contract_lhs,), (contract_rhs,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def chunk_output(q, k, v, state, decay_cc, geo: ChunkGeometry, s, *, reverse: bool, precision,
                 doc_col=None, doc_row=None, doc_prev=None) -> jax.Array:
    """o [C, Dv] float32 for q, k [C, Dk], v [C, Dv], state [Dk, Dv] float32 (entering the chunk)."""
    scores = _dot(q, k, precision, 1, 1)  # [C, C] = q k^T
    mask = geo.valid_row
    if doc_col is not None:
        mask = mask & (doc_col == doc_row)
    scores = scores * jnp.where(mask, decay_cc, 0.0)
    out = _dot(scores.astype(v.dtype), v, precision)
    pos = lax.broadcasted_iota(jnp.int32, geo.valid_col.shape, 0)
    dist = (geo.b - pos) if reverse else (pos - geo.a)  # >= 0 on valid tokens
    sees = geo.valid_col if doc_col is None else geo.valid_col & (doc_col == doc_prev)
    w = jnp.where(sees, jnp.exp(-s * jnp.maximum(dist, 0).astype(jnp.float32)), 0.0)  # [C, 1]
    # The state is rounded to the input dtype for the tensor cores (as fla does); its decay is applied in fp32 after.
    return out + _dot(q, state.astype(q.dtype), precision) * w


def chunk_state(k, v, state, geo: ChunkGeometry, s, *, reverse: bool, precision,
                doc_col=None, doc_prev=None):
    """(state [Dk, Dv] float32 leaving the chunk, its document [1, 1] or None); k [C, Dk], v [C, Dv]."""
    pos = lax.broadcasted_iota(jnp.int32, geo.valid_col.shape, 0)
    dist = (pos - geo.a) if reverse else (geo.b - pos)
    keep = geo.valid_col
    carry = jnp.exp(-s * (geo.b - geo.a).astype(jnp.float32))
    doc_end = None
    if doc_col is not None:
        # Documents are numbered in walk order, so the chunk's last document is the extreme one over valid tokens.
        if reverse:
            doc_end = jnp.minimum(doc_prev, jnp.min(jnp.where(geo.valid_col, doc_col, doc_prev), keepdims=True))
        else:
            doc_end = jnp.maximum(doc_prev, jnp.max(jnp.where(geo.valid_col, doc_col, doc_prev), keepdims=True))
        keep = keep & (doc_col == doc_end)
        carry = jnp.where(doc_end == doc_prev, carry, 0.0)
    w = jnp.where(keep, jnp.exp(-s * jnp.maximum(dist, 0).astype(jnp.float32)), 0.0)  # [C, 1]
    k_w = (k.astype(jnp.float32) * w).astype(k.dtype)
    return carry * state + _dot(k_w, v, precision, 0, 0), doc_end


def matmul_precision(dtype):
    """fp32 inputs get IEEE fp32 dots (Triton's default for fp32 is TF32); bf16/fp16 use the tensor cores as is."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def walk_step(q, k, v, state, geo: ChunkGeometry, s, decay_cc, *, reverse: bool, precision,
              doc_col=None, doc_row=None, doc_prev=None):
    """One chunk of a walk: (o [C, Dv] float32 or None when ``q`` is None, new state, document of the new state)."""
    o = None
    if q is not None:
        o = chunk_output(q, k, v, state, decay_cc, geo, s, reverse=reverse, precision=precision,
                         doc_col=doc_col, doc_row=doc_row, doc_prev=doc_prev)
    state, doc_end = chunk_state(k, v, state, geo, s, reverse=reverse, precision=precision,
                                 doc_col=doc_col, doc_prev=doc_prev)
    return o, state, doc_end
