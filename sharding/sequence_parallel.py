"""Sequence parallelism over the mesh axis ``sequence``: lightning (linear) attention and softmax attention.

Lightning (LASP-2 style, one all-gather of states): shard i of P holds tokens [i*L, (i+1)*L). It runs its local
chunks from a zero state, giving local outputs and its local final state M_i [B, H, Dk, Dv], plus the factor
a_i [B, H] by which a state entering the shard survives to its end: exp(-s*L), or 0 when a packed-document boundary
falls inside the shard (or at its first token). The (a_i, M_i) are all-gathered and prefix-combined,
S_in(i) = a_{i-1} S_in(i-1) + M_{i-1} (the initial state, if any, entering shard 0), and each shard adds
o_t += exp(-s*(t+1)) * alive_t * q_t . S_in(i) for its local position t, where alive_t is 0 from the shard's first
segment change on. Everything is differentiable JAX, so gradients come from the same code (all_gather transposes to
a reduce-scatter).

Softmax (ring attention): no device ever holds more than two shards' K/V. Shard i keeps its queries and passes
its K/V block (with its segment ids) around the ring of ``sequence`` devices with ``jax.lax.ppermute``: at step s
it holds the block of shard (i - s) mod P, attends to it with the queries at their global slots (so the causal and
segment masks are the unsharded ones restricted to this pair of blocks), and merges the partial result into its
running output by the two logsumexps (online softmax over blocks). Blocks wholly in the future (s > i) are skipped.
The transfer of the next block is issued before the current block's attention, so the two can overlap. The
backward (a custom VJP) runs the same ring again: each block's attention is recomputed and differentiated, dq stays
home, and dk, dv travel with their K/V block (one hop behind it) and reach its owner after the last hop. The local
queries go through each block in chunks of ``query_chunk``, updating the running output in place, so a call's own
temporaries are O(chunk). Memory per device: O(T/P) (q, the fp32 running output and dq, the logsumexp, two K/V
blocks and their fp32 dk, dv), against O(T) for all-gathered K/V.

Ring rather than all-to-all over heads (Ulysses): an all-to-all needs the KV heads to split over ``sequence``
(M1 has 8 KV heads, and a 1M-token prefill wants sequence = 16), and it would hold whole-sequence K/V for the local
heads. The causal ring leaves shard i idle for P - 1 - i steps (shard 0 attends to one block, shard P-1 to all);
a zig-zag token layout would balance that, at the price of re-laying out the sequence sharding the other layers
use.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.attention.reference import MASKED
from sharding.rules import logical_to_mesh_spec

SEQUENCE_AXIS = "sequence"


def sequence_shards(length: int) -> int:
    """Number of sequence shards under the current mesh (jax.set_mesh) for a length-``length`` sequence: the size of
    ``sequence`` when it is > 1, not already manual, and divides ``length``; else 1 (run unsharded)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE_AXIS not in mesh.axis_names or SEQUENCE_AXIS in mesh.manual_axes:
        return 1
    size = mesh.shape[SEQUENCE_AXIS]
    return size if size > 1 and length % size == 0 else 1


def _specs(shape_bthd, heads_name):
    mesh = jax.sharding.get_abstract_mesh()
    b, t, h, _ = shape_bthd
    x = logical_to_mesh_spec(("batch", "length", heads_name, None), shape=shape_bthd, mesh=mesh)
    assert x[1] == SEQUENCE_AXIS, f"length {t} is not sharded over {SEQUENCE_AXIS}: {x}"
    return x, P(x[0], x[1]), P(x[2])


def lightning_sequence_parallel(q, k, v, decay, *, initial_state=None, segment_ids=None, lightning_attention,
                                return_final_state=False):
    """``lightning_attention`` with the length axis split over ``sequence`` (call under jax.set_mesh).

    Args:
      q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; decay: [H] fp32 rates; initial_state: [B, H, Dk, Dv] fp32 or None;
      segment_ids: [B, T] or None; lightning_attention: the local kernel (``pallas_kernels.lightning`` API with
      implementation/block size bound).
    Returns o [B, T, H, Dv] (v's dtype), and the global final state [B, H, Dk, Dv] when ``return_final_state``.
    """
    x_spec, bt_spec, h_spec = _specs(q.shape, "heads")
    state_spec = P(x_spec[0], x_spec[2], None, None)
    has_init, has_seg = initial_state is not None, segment_ids is not None

    def body(q, k, v, decay, init, seg):
        b, t, h, dk = q.shape
        seg = seg if has_seg else None
        idx = jax.lax.axis_index(SEQUENCE_AXIS)
        o, local_state = lightning_attention(q, k, v, decay, segment_ids=seg, return_final_state=True)
        if has_seg:
            last = jax.lax.all_gather(seg[:, -1], SEQUENCE_AXIS)               # [P, B] each shard's last id
            prev = jnp.where(idx > 0, last[jnp.maximum(idx - 1, 0)], seg[:, 0])
            same = seg == jnp.concatenate([prev[:, None], seg[:, :-1]], axis=1)
            alive = jnp.cumprod(same.astype(jnp.float32), axis=1)              # [B, t]
        else:
            alive = jnp.ones((b, t), jnp.float32)
        survive = alive[:, -1:] * jnp.exp(-decay * t)[None]                   # [B, H]
        a_all = jax.lax.all_gather(survive, SEQUENCE_AXIS)                     # [P, B, H]
        m_all = jax.lax.all_gather(local_state, SEQUENCE_AXIS)                 # [P, B, H, Dk, Dv]
        first = (jnp.ones_like(survive), init if has_init else jnp.zeros_like(local_state))
        a_all = jnp.concatenate([first[0][None], a_all])
        m_all = jnp.concatenate([first[1][None], m_all])
        acc = [m_all[0]]                                                       # acc[j]: state entering shard j
        for j in range(1, a_all.shape[0]):                                     # P is small: a static loop
            acc.append(a_all[j][..., None, None] * acc[-1] + m_all[j])
        acc = jnp.stack(acc)
        s_in = acc[idx]
        steps = jnp.exp(-decay[None, :] * (jnp.arange(1, t + 1, dtype=jnp.float32)[:, None]))  # [t, H]
        corr = jnp.einsum("bthk,bhkv->bthv", q.astype(jnp.float32), s_in, precision=jax.lax.Precision.HIGHEST)
        o = (o.astype(jnp.float32) + corr * steps[None, :, :, None] * alive[:, :, None, None]).astype(o.dtype)
        return o, acc[-1]

    init = initial_state if has_init else jnp.zeros((), jnp.float32)
    seg = segment_ids if has_seg else jnp.zeros((), jnp.int32)
    o, final = jax.shard_map(
        body, in_specs=(x_spec, x_spec, x_spec, h_spec, state_spec if has_init else P(), bt_spec if has_seg else P()),
        out_specs=(x_spec, state_spec), check_vma=False)(q, k, v, decay, init, seg)
    return (o, final) if return_final_state else o


QUERY_CHUNK = 4096  # queries per block-attention call: bounds the call's temporaries (its output, transposes)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static part of a ring-attention call (hashable, for ``nondiff_argnums``)."""
    attention_mask: Callable
    attention: Callable
    size: int    # P, the ``sequence`` axis size
    length: int  # L = T / P, the shard length
    chunk: int   # queries per block-attention call (divides L)

    def perm(self):
        return [(j, (j + 1) % self.size) for j in range(self.size)]

    def block(self, q, k, v, q_seg, k_seg, first, source):
        """Attention of the local queries ``first .. first + c`` (q [B, c, H, Dh]) to the K/V block of shard
        ``source``, at global slots: (out [B, c, H, Dh], lse [B, c, H] fp32)."""
        b, c = q.shape[:2]
        length = k.shape[1]
        here = jax.lax.axis_index(SEQUENCE_AXIS)
        q_slot = jnp.broadcast_to(here * length + first + jnp.arange(c, dtype=jnp.int32)[None], (b, c))
        k_slot = jnp.broadcast_to(source * length + jnp.arange(length, dtype=jnp.int32)[None], (b, length))
        return self.attention(q, k, v, self.attention_mask(q_slot, k_slot, q_seg, k_seg), return_lse=True)

    def chunks(self, fn, carry):
        """``fn(first, carry)`` for each query chunk's first index, in a loop (the carry is updated in place)."""
        return jax.lax.fori_loop(0, self.length // self.chunk, lambda i, c: fn(i * self.chunk, c), carry)


def _rows(x, first, size):
    """x[:, first:first + size] of a [B, L, ...] array (None stays None)."""
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, first, size, axis=1)


def _put(x, part, first):
    return jax.lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), first, axis=1)


def _merge(acc, part):
    """Two partial attentions over disjoint keys -> their union: (out fp32 [B, c, H, Dh], lse [B, c, H])."""
    (o_a, lse_a), (o_b, lse_b) = acc, part
    lse = jnp.logaddexp(lse_a, lse_b)
    w_a, w_b = jnp.exp(lse_a - lse)[..., None], jnp.exp(lse_b - lse)[..., None]
    return w_a * o_a + w_b * o_b.astype(jnp.float32), lse


def _ring_forward(ring: _Ring, q, k, v, seg):
    here = jax.lax.axis_index(SEQUENCE_AXIS)

    def attend(acc, kv, s):
        """Merge the block held at step s (shard (here - s) mod P's) into acc, chunk by chunk; skipped when it is
        wholly in the future (s > here)."""
        kb, vb, k_seg = kv
        source = (here - s) % ring.size

        def chunk(first, acc):
            o, lse = acc
            part = ring.block(_rows(q, first, ring.chunk), kb, vb, _rows(seg, first, ring.chunk), k_seg, first,
                              source)
            o_c, lse_c = _merge((_rows(o, first, ring.chunk), _rows(lse, first, ring.chunk)), part)
            return _put(o, o_c, first), _put(lse, lse_c, first)

        return jax.lax.cond(s <= here, lambda a: ring.chunks(chunk, a), lambda a: a, acc)

    def step(carry, s):
        kv, acc = carry
        nxt = jax.lax.ppermute(kv, SEQUENCE_AXIS, ring.perm())  # issued first: it overlaps this step's attention
        return (nxt, attend(acc, kv, s)), None

    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], MASKED, jnp.float32))
    (kv, acc), _ = jax.lax.scan(step, ((k, v, seg), acc), jnp.arange(ring.size - 1))
    o, lse = attend(acc, kv, ring.size - 1)
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, seg):
    return _ring_forward(ring, q, k, v, seg)[0]


def _ring_attention_fwd(ring, q, k, v, seg):
    out, lse = _ring_forward(ring, q, k, v, seg)
    return out, (q, k, v, seg, out, lse)


def _ring_attention_bwd(ring, residuals, d_out):
    """Per block and query chunk: recompute its (out_j, lse_j), and pull back the cotangents the merge gives them,
    d out_j = w_j dO and d lse_j = w_j <dO, out_j - out> with w_j = exp(lse_j - lse)."""
    q, k, v, seg, out, lse = residuals
    here = jax.lax.axis_index(SEQUENCE_AXIS)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, L, H]

    def visit(kv, dkv, dq, s):
        kb, vb, k_seg = kv
        source = (here - s) % ring.size

        def chunk(first, carry):
            (dk, dv), dq = carry
            rows = functools.partial(_rows, first=first, size=ring.chunk)
            (o_j, lse_j), vjp = jax.vjp(lambda q_c, kb, vb: ring.block(q_c, kb, vb, rows(seg), k_seg, first, source),
                                        rows(q), kb, vb)
            w = jnp.exp(lse_j - rows(lse))
            d_o = rows(d_out).astype(jnp.float32)
            d_lse = w * (jnp.sum(d_o * o_j.astype(jnp.float32), axis=-1) - rows(delta))
            dq_j, dk_j, dv_j = vjp(((w[..., None] * d_o).astype(o_j.dtype), d_lse))
            return (dk + dk_j.astype(jnp.float32), dv + dv_j.astype(jnp.float32)), _put(dq, rows(dq) + dq_j, first)

        return jax.lax.cond(s <= here, lambda a: ring.chunks(chunk, a), lambda a: a, (dkv, dq))

    def step(carry, s):
        kv, dkv, dq = carry
        nxt = jax.lax.ppermute(kv, SEQUENCE_AXIS, ring.perm())  # the next block, while this one is differentiated
        dkv, dq = visit(kv, dkv, dq, s)
        return (nxt, jax.lax.ppermute(dkv, SEQUENCE_AXIS, ring.perm()), dq), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    (kv, dkv, dq), _ = jax.lax.scan(step, ((k, v, seg), (zeros(k), zeros(v)), zeros(q)), jnp.arange(ring.size - 1))
    dkv, dq = visit(kv, dkv, dq, ring.size - 1)
    # The accumulators travelled with their block; after P visits and one more hop they are back with its owner.
    dk, dv = jax.lax.ppermute(dkv, SEQUENCE_AXIS, ring.perm())
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def attention_sequence_parallel(q, k, v, segment_ids, *, attention_mask, attention,
                                query_chunk: int = QUERY_CHUNK):
    """Causal GQA with the length axis split over ``sequence``: ring attention (the module docstring).

    q [B, T, H, Dh], k/v [B, T, Hkv, Dh], segment_ids [B, T] or None -> [B, T, H, Dh]. With L = T / P and c the
    query chunk (the largest divisor of L not above ``query_chunk``): ``attention_mask(q_slot [B, c], k_slot [B, L],
    q_segment, k_segment)`` builds the mask of a query chunk against one shard's K/V block at global slots, and
    ``attention(q, k, v, mask, return_lse=True)`` returns (out [B, c, H, Dh], logsumexp [B, c, H] fp32) with a very
    negative finite logsumexp for rows that see no key (in the model: ``pallas_kernels.attention``'s ``Mask`` and
    ``attention`` with the implementation bound).
    """
    q_spec, bt_spec, _ = _specs(q.shape, "heads")
    mesh = jax.sharding.get_abstract_mesh()
    kv_spec = P(q_spec[0], q_spec[1], logical_to_mesh_spec(("kv",), shape=(k.shape[2],), mesh=mesh)[0], None)
    has_seg = segment_ids is not None
    size = mesh.shape[SEQUENCE_AXIS]
    length = q.shape[1] // size
    chunk = max(c for c in range(1, min(length, query_chunk) + 1) if length % c == 0)
    ring = _Ring(attention_mask, attention, size, length, chunk)

    def body(q, k, v, seg):
        return _ring_attention(ring, q, k, v, seg if has_seg else None)

    seg = segment_ids if has_seg else jnp.zeros((), jnp.int32)
    return jax.shard_map(body, in_specs=(q_spec, kv_spec, kv_spec, bt_spec if has_seg else P()), out_specs=q_spec,
                         check_vma=False)(q, k, v, seg)
