"""Sequence parallelism over the mesh axis ``sequence``: lightning (linear) attention and softmax attention.

Lightning (LASP-2 style, one all-gather of states): shard i of P holds tokens [i*L, (i+1)*L). It runs its local
chunks from a zero state, giving local outputs and its local final state M_i [B, H, Dk, Dv], plus the factor
a_i [B, H] by which a state entering the shard survives to its end: exp(-s*L), or 0 when a packed-document boundary
falls inside the shard (or at its first token). The (a_i, M_i) are all-gathered and prefix-combined,
S_in(i) = a_{i-1} S_in(i-1) + M_{i-1} (the initial state, if any, entering shard 0), and each shard adds
o_t += exp(-s*(t+1)) * alive_t * q_t . S_in(i) for its local position t, where alive_t is 0 from the shard's first
segment change on. Everything is differentiable JAX, so gradients come from the same code (all_gather transposes to
a reduce-scatter).

Softmax: K, V and the segment ids are all-gathered over ``sequence``; queries keep their global slots, so the
causal and segment masks are the unsharded ones restricted to the shard's rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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


def attention_sequence_parallel(q, k, v, segment_ids, *, attention_mask, attention):
    """Causal GQA with the length axis split over ``sequence``: K/V all-gathered, masks on global slots.

    q [B, T, H, Dh], k/v [B, T, Hkv, Dh], segment_ids [B, T] or None -> [B, T, H, Dh]. ``attention_mask(q_slot [B, t],
    k_slot [B, T], q_segment, k_segment)`` builds the mask and ``attention(q, k, v, mask)`` applies it (in the model:
    ``pallas_kernels.attention``'s ``Mask`` and ``attention``); each shard runs them on its rows against all keys.
    """
    q_spec, bt_spec, _ = _specs(q.shape, "heads")
    kv_spec = P(q_spec[0], q_spec[1], logical_to_mesh_spec(("kv",), shape=(k.shape[2],),
                                                          mesh=jax.sharding.get_abstract_mesh())[0], None)
    has_seg = segment_ids is not None

    def body(q, k, v, seg):
        b, t = q.shape[:2]
        idx = jax.lax.axis_index(SEQUENCE_AXIS)
        k_all, v_all = (jax.lax.all_gather(a, SEQUENCE_AXIS, axis=1, tiled=True) for a in (k, v))
        q_slot = jnp.broadcast_to(idx * t + jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        k_slot = jnp.broadcast_to(jnp.arange(k_all.shape[1], dtype=jnp.int32)[None], (b, k_all.shape[1]))
        seg_all = jax.lax.all_gather(seg, SEQUENCE_AXIS, axis=1, tiled=True) if has_seg else None
        mask = attention_mask(q_slot, k_slot, seg if has_seg else None, seg_all)
        return attention(q, k_all, v_all, mask)

    seg = segment_ids if has_seg else jnp.zeros((), jnp.int32)
    return jax.shard_map(body, in_specs=(q_spec, kv_spec, kv_spec, bt_spec if has_seg else P()), out_specs=q_spec,
                         check_vma=False)(q, k, v, seg)
