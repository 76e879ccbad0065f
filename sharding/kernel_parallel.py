"""Run the attention and norm kernels per device under a mesh: ``jax.shard_map`` over the batch and head axes (the
norms: over their rows).

A ``pallas_call`` has no partitioning rule, so under GSPMD the partitioner would gather its operands onto every device
and run the whole kernel there (correct, but every device does all the work). Lightning and softmax attention are
independent per (batch row, head), so splitting those axes as the sharding rules place them needs no communication at
all. The sequence axis is not split here: ``sharding.sequence_parallel`` handles that case (it needs the state
hand-off, or the all-gathered keys).
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_to_mesh_spec


def _local_spec(logical, shape) -> P | None:
    """PartitionSpec of an operand with these logical axes under the current mesh, or None for the plain call (no
    mesh, or inside a shard_map already)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = logical_to_mesh_spec(logical, shape=shape, mesh=mesh)
    manual = set(mesh.manual_axes)
    used = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
    if used & manual or (manual and not used):
        return None
    return spec


def batch_head_specs(shape_bthd) -> P | None:
    """PartitionSpec [B, T, H, D] of the kernel operands under the current mesh, or None for the plain call (no mesh,
    or inside a shard_map already).

    Where no mesh axis divides batch or heads (a single long prefill row, say) the spec is all-replicated: every
    device runs the whole kernel, which is what GSPMD would do too, but a Mosaic ``pallas_call`` cannot be handed to
    the partitioner at all, so it still needs the ``shard_map``.
    """
    return _local_spec(("batch", None, "heads", None), shape_bthd)


def norm_rows_parallel(norm, x, weight, gate=None, *, feature_axis: str | None):
    """``norm(x, weight, gate)``, a row-wise op over the last axis (``pallas_kernels.norms.rms_norm`` with its
    settings bound), with the rows split over the mesh as the activations' are (call under jax.set_mesh).

    x, gate: [B, T, D] (rows by "batch" and "length") or [N, D] (by "batch"); weight [D], replicated (its gradient is
    summed over the devices by the shard_map's transpose). ``feature_axis`` is D's logical name: where the mesh splits
    it (the lightning norm over tensor-parallel heads) the statistics cross devices, so ``norm`` is called with
    ``implementation="xla"`` and GSPMD partitions it. Falls back to the plain call without a mesh.
    """
    if x.ndim not in (2, 3):
        return norm(x, weight, gate)
    spec = _local_spec(("batch", "length")[: x.ndim - 1] + (feature_axis,), x.shape)
    if spec is None:
        return norm(x, weight, gate)
    if spec[-1] is not None:
        return norm(x, weight, gate, implementation="xla")
    if gate is None:
        return jax.shard_map(lambda x, w: norm(x, w, None), in_specs=(spec, P()), out_specs=spec,
                             check_vma=False)(x, weight)
    return jax.shard_map(norm, in_specs=(spec, P(), spec), out_specs=spec, check_vma=False)(x, weight, gate)


def lightning_batch_head_parallel(q, k, v, decay, *, initial_state=None, segment_ids=None, lightning_attention,
                                  return_final_state=False):
    """``lightning_attention`` with its batch and head axes split over the mesh (call under jax.set_mesh).

    Same arguments and returns as ``pallas_kernels.lightning.lightning_attention`` (q, k [B, T, H, Dk], v [B, T, H, Dv],
    decay [H], initial_state [B, H, Dk, Dv], segment_ids [B, T]); falls back to the plain call without a mesh.
    """
    x_spec = batch_head_specs(q.shape)
    if x_spec is None:
        return lightning_attention(q, k, v, decay, initial_state=initial_state, segment_ids=segment_ids,
                                   return_final_state=return_final_state)
    batch_axes, head_axes = x_spec[0], x_spec[2]
    state_spec = P(batch_axes, head_axes, None, None)
    has_init, has_seg = initial_state is not None, segment_ids is not None

    def body(q, k, v, decay, init, seg):
        return lightning_attention(q, k, v, decay, initial_state=init if has_init else None,
                                   segment_ids=seg if has_seg else None, return_final_state=True)

    o, final = jax.shard_map(
        body, in_specs=(x_spec, x_spec, x_spec, P(head_axes), state_spec if has_init else P(),
                        P(batch_axes, None) if has_seg else P()),
        out_specs=(x_spec, state_spec), check_vma=False)(  # check_vma=False: pallas_call under shard_map fails the check (interpret mode too)
        q, k, v, decay, initial_state if has_init else jax.numpy.zeros(()),
        segment_ids if has_seg else jax.numpy.zeros(()))
    return (o, final) if return_final_state else o


def attention_batch_head_parallel(q, k, v, mask, *, attention):
    """``attention(q, k, v, mask)`` with its batch and head axes split over the mesh (call under jax.set_mesh).

    q [B, Tq, H, Dh], k/v [B, Tk, Hkv, Dh]; ``mask`` a pytree of [B, ...] arrays (split with the batch) and scalars
    (replicated), ``pallas_kernels.attention.Mask``; ``attention`` the local function (its api with the
    implementation bound). Heads are split only where query and KV heads split alike, so that each device's query
    heads read its own KV heads (GQA). Falls back to the plain call without a mesh.
    """
    q_spec = batch_head_specs(q.shape)
    if q_spec is None:
        return attention(q, k, v, mask)
    kv_heads = logical_to_mesh_spec((None, None, "kv", None), shape=k.shape, mesh=jax.sharding.get_abstract_mesh())[2]
    batch_axes, head_axes = q_spec[0], q_spec[2] if q_spec[2] == kv_heads else None
    x_spec = P(batch_axes, None, head_axes, None)
    mask_spec = jax.tree.map(lambda a: P(batch_axes) if a.ndim else P(), mask)
    return jax.shard_map(attention, in_specs=(x_spec, x_spec, x_spec, mask_spec), out_specs=x_spec,
                         check_vma=False)(q, k, v, mask)
