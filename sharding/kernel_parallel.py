"""Run the lightning kernel per device under a mesh: ``jax.shard_map`` over the batch and head axes.

A ``pallas_call`` has no partitioning rule, so under GSPMD the partitioner would gather its operands onto every device
and run the whole kernel there (correct, but every device does all the work). Lightning attention is independent per
(batch row, head), so splitting those axes as the sharding rules place them needs no communication at all.
The sequence axis is not split here: ``sharding.sequence_parallel`` handles that case (it needs the state hand-off).
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_to_mesh_spec


def batch_head_specs(shape_bthd) -> P | None:
    """PartitionSpec [B, T, H, D] of the kernel operands under the current mesh, or None when nothing is split
    (no mesh, axes already manual, or no mesh axis divides batch/heads)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = logical_to_mesh_spec(("batch", None, "heads", None), shape=shape_bthd, mesh=mesh)
    manual = set(mesh.manual_axes)
    used = {a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)}
    if not used or used & manual:
        return None
    return spec


def lightning_batch_head_parallel(q, k, v, decay, *, initial_state=None, segment_ids=None, lightning_attention,
                                  return_final_state=False):
    """``lightning_attention`` with its batch and head axes split over the mesh (call under jax.set_mesh).

    Same arguments and returns as ``pallas_kernels.lightning.lightning_attention`` (q, k [B, T, H, Dk], v [B, T, H, Dv],
    decay [H], initial_state [B, H, Dk, Dv], segment_ids [B, T]); falls back to the plain call when nothing is split.
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
        out_specs=(x_spec, state_spec), check_vma=False)(  # check_vma=False: Pallas kernels (jax-notes 9.7)
        q, k, v, decay, initial_state if has_init else jax.numpy.zeros(()),
        segment_ids if has_seg else jax.numpy.zeros(()))
    return (o, final) if return_final_state else o
