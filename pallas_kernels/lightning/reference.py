"""Pure-JAX lightning attention: the oracle and the portable fallback.

Lightning attention (MiniMax-01/M1) is causal linear attention with a per-head exponential decay:

    S_t = exp(-s) S_{t-1} + k_t^T v_t          (state [Dk, Dv], float32)
    o_t = q_t S_t                               (current token included, no scaling, no normaliser)

i.e. ``o_t = sum_{j<=t} exp(-s (t-j)) (q_t . k_j) v_j``.  ``segment_ids`` mark packed documents: the state is reset
to zero wherever ``segment_ids[t] != segment_ids[t-1]``; ``initial_state`` is the state before token 0.

Two implementations live here:
* ``lightning_attention_recurrent``: the per-token recurrence (``lax.scan`` over tokens). Slow; the in-JAX oracle.
* ``lightning_attention_chunked``: the block algorithm of the M1 spec (section 3.4), a ``lax.scan`` over blocks that
  carries the float32 state; the intra-block part is a masked matmul. Any block size gives the same result.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _document_index(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    """[B, T] int32 running document number: +1 at every segment change (0 for the first token)."""
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    changes = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.int32), (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1)
    return jnp.cumsum(changes, axis=1)


def _matmul_precision(dtype) -> lax.Precision:
    # fp32 inputs get true fp32 matmuls (no TF32 on GPU); low-precision inputs accumulate in fp32 anyway.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def lightning_attention_recurrent(q, k, v, decay, *, initial_state=None, segment_ids=None):
    """Per-token recurrence. q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; decay: [H] rates s (factor exp(-s)).

    Returns (o [B, T, H, Dv] in v's dtype, final_state [B, H, Dk, Dv] float32).
    """
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    lam = jnp.exp(-decay.astype(jnp.float32))[None, :, None, None]  # [1, H, 1, 1]
    state0 = (jnp.zeros((batch, heads, dk, dv), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))
    doc = _document_index(segment_ids, batch, length)
    reset = jnp.concatenate([jnp.zeros((batch, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)  # [B, T]
    prec = _matmul_precision(q.dtype)

    def step(state, xs):
        q_t, k_t, v_t, reset_t = xs  # [B, H, Dk], [B, H, Dk], [B, H, Dv], [B]
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        state = lam * state + jnp.einsum("bhk,bhv->bhkv", k_t.astype(jnp.float32), v_t.astype(jnp.float32),
                                         precision=prec)
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t.astype(jnp.float32), state, precision=prec)
        return state, o_t

    xs = (jnp.moveaxis(q, 1, 0), jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(reset, 1, 0))
    final_state, o = lax.scan(step, state0, xs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), final_state


def lightning_attention_chunked(q, k, v, decay, *, initial_state=None, segment_ids=None, block_size: int = 256):
    """The block algorithm (masked products within a block, the carried state across blocks) as a ``lax.scan`` over
    blocks carrying the float32 state.

    Same arguments and returns as ``lightning_attention_recurrent`` plus ``block_size``. ``T`` need not be a multiple
    of the block: the tail is zero-padded and the padded tokens are excluded from the state.
    """
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    blk = int(min(block_size, max(length, 1)))
    n_blocks = -(-length // blk)
    pad = n_blocks * blk - length
    s = decay.astype(jnp.float32)  # [H]
    doc = _document_index(segment_ids, batch, length)
    valid = jnp.ones((batch, length), bool)
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    # Document of the token before each block (block 0: the initial state's document, i.e. token 0's).
    doc_blocks = doc.reshape(batch, n_blocks, blk)
    doc_before = jnp.concatenate([doc_blocks[:, :1, 0], doc_blocks[:, :-1, -1]], axis=1)  # [B, N]

    def blocks(x):  # [B, N*blk, ...] -> [N, B, blk, ...]
        return jnp.moveaxis(x.reshape((batch, n_blocks, blk) + x.shape[2:]), 1, 0)

    idx = jnp.arange(blk, dtype=jnp.float32)
    causal = idx[:, None] >= idx[None, :]
    # exp(-s (i - j)) on and below the diagonal; [H, blk, blk]
    diag_decay = jnp.where(causal[None], jnp.exp(-s[:, None, None] * jnp.maximum(idx[:, None] - idx[None, :], 0.0)),
                           0.0)
    q_decay = jnp.exp(-s[:, None] * (idx[None, :] + 1.0))  # [H, blk]: exp(-s (i+1))
    prec = _matmul_precision(q.dtype)
    state0 = (jnp.zeros((batch, heads, dk, dv), jnp.float32) if initial_state is None
              else initial_state.astype(jnp.float32))

    def step(state, xs):
        qb, kb, vb, docb, validb, doc_prev = xs  # [B, blk, H, D], [B, blk], [B, blk], [B]
        same_doc = (docb[:, :, None] == docb[:, None, :]) & validb[:, None, :]  # [B, i, j]
        scores = jnp.einsum("bihd,bjhd->bhij", qb, kb, preferred_element_type=jnp.float32, precision=prec)
        scores = scores * diag_decay[None] * same_doc[:, None]
        intra = jnp.einsum("bhij,bjhv->bihv", scores, vb.astype(jnp.float32), precision=prec)
        sees_state = (docb == doc_prev[:, None])  # [B, blk]: no boundary between the block start and token i
        inter = jnp.einsum("bihk,bhkv->bihv", qb.astype(jnp.float32), state, precision=prec)
        inter = inter * (q_decay.T[None] * sees_state[:, :, None])[..., None]
        # State hand-off: only tokens of the block's last document enter it, decayed to the last valid token.
        n_valid = jnp.sum(validb, axis=1)  # [B]
        last = jnp.maximum(n_valid - 1, 0)
        doc_last = jnp.take_along_axis(docb, last[:, None], axis=1)[:, 0]
        offset = (last[:, None] - jnp.arange(blk)[None, :]).astype(jnp.float32)  # [B, blk]: m-1-j
        k_keep = (docb == doc_last[:, None]) & validb
        k_decay = jnp.where(k_keep[:, None, :], jnp.exp(-s[None, :, None] * jnp.maximum(offset, 0.0)[:, None, :]), 0.0)
        k_scaled = kb.astype(jnp.float32) * jnp.moveaxis(k_decay, 1, 2)[..., None]  # [B, blk, H, Dk]
        carry = jnp.where(doc_last == doc_prev, 1.0, 0.0)[:, None, None, None]
        block_decay = jnp.exp(-s[None, :] * n_valid[:, None].astype(jnp.float32))[:, :, None, None]  # [B, H, 1, 1]
        state = carry * block_decay * state + jnp.einsum("bjhk,bjhv->bhkv", k_scaled, vb.astype(jnp.float32),
                                                        precision=prec)
        return state, intra + inter

    xs = (blocks(q), blocks(k), blocks(v), blocks(doc), blocks(valid), jnp.moveaxis(doc_before, 1, 0))
    final_state, o = lax.scan(step, state0, xs)
    o = jnp.moveaxis(o, 0, 1).reshape(batch, n_blocks * blk, heads, dv)[:, :length]
    return o.astype(v.dtype), final_state


def lightning_decode_step(q, k, v, decay, state):
    """One token of the recurrence. q, k: [B, H, Dk]; v: [B, H, Dv]; state [B, H, Dk, Dv] float32.

    Returns (o [B, H, Dv] in v's dtype, new_state float32).
    """
    lam = jnp.exp(-decay.astype(jnp.float32))[None, :, None, None]
    prec = _matmul_precision(q.dtype)
    state = lam * state.astype(jnp.float32) + jnp.einsum(
        "bhk,bhv->bhkv", k.astype(jnp.float32), v.astype(jnp.float32), precision=prec)
    o = jnp.einsum("bhk,bhkv->bhv", q.astype(jnp.float32), state, precision=prec)
    return o.astype(v.dtype), state
