"""Where the RL learner's arrays live: a mesh over every process's devices, or (no mesh) the first local device.

The learner keeps all large arrays on devices: params and optimizer state placed by the logical-axis rules
(``sharding.rules.state_shardings``), rollout rows and update batches sharded over the mesh's batch axes. The host
sees only the rows its own devices hold (``host_rows``: for scoring them) and small per-row vectors that every process
needs whole (``gather_rows``: rewards, lengths), which it assembles by an all-gather over processes.

Host data that every process holds whole (prompts, the group selection) becomes a global array through
``sharding.multihost.global_array``: each process supplies the rows its devices hold.
"""
from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sharding.multihost import global_array, local_rows
from sharding.rules import batch_sharding, state_shardings


class Placement:
    """Placement of the learner's arrays on ``mesh`` (a ``jax.sharding.Mesh`` over all processes' devices), or on
    the first local device when ``mesh`` is None (one process)."""

    def __init__(self, mesh: jax.sharding.Mesh | None = None):
        self.mesh = mesh
        if mesh is None and jax.process_count() > 1:
            raise ValueError("a run of several processes needs a mesh over their devices (sharding.mesh.make_mesh)")

    def context(self):
        """``jax.set_mesh(mesh)`` (activation sharding annotations apply), or nothing without a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------------ host -> device
    def row_sharding(self, shape) -> jax.sharding.Sharding:
        """Rows (axis 0) split over the mesh's batch axes (those that divide it); the rest of the array whole."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return batch_sharding(self.mesh, shape, ("batch",) + (None,) * (len(shape) - 1))

    def rows(self, host: np.ndarray) -> jax.Array:
        """A global array, split over rows, of ``host`` (which every process holds whole): each process supplies only
        the rows its devices hold."""
        host = np.asarray(host)
        sharding = self.row_sharding(host.shape)
        if self.mesh is None:
            return jax.device_put(host, sharding)
        return global_array(host[local_rows(sharding, host.shape)], sharding, host.shape)

    def replicated(self, host: np.ndarray) -> jax.Array:
        """``host`` (the same on every process) on every device."""
        host = np.asarray(host)
        if self.mesh is None:
            return jax.device_put(host, jax.local_devices()[0])
        return jax.make_array_from_callback(host.shape, NamedSharding(self.mesh, PartitionSpec()),
                                            lambda index: host[index])

    def state(self, tree: Any) -> Any:
        """A fresh copy of a params (nnx.State) tree placed by the logical-axis rules (no buffer is shared with
        ``tree``: the RL update donates its inputs). Leaves may be host arrays, arrays of one device, or global arrays
        already on this mesh."""
        if self.mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            return jax.jit(_copy, out_shardings=device)(tree)
        shardings = state_shardings(tree, self.mesh)

        def place(leaf, sharding):
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                return jax.jit(jnp.copy, out_shardings=sharding)(leaf)
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

        return jax.tree_util.tree_map(place, tree, shardings)

    # ------------------------------------------------------------------------------------------------ device -> host
    @staticmethod
    def host_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """The rows of ``x`` (split over axis 0) that this process's devices hold: (row indices [r] sorted,
        values [r, ...])."""
        pieces = {}
        for shard in x.addressable_shards:
            rows = shard.index[0].indices(x.shape[0])
            if rows not in pieces:  # the same rows on several devices (an axis that does not split the rows)
                pieces[rows] = shard.data
        held = sorted(pieces)
        index = np.concatenate([np.arange(*r) for r in held])
        values = np.concatenate([np.asarray(pieces[r]) for r in held])
        order = np.argsort(index, kind="stable")
        index, values = index[order], values[order]
        first = np.concatenate([[True], index[1:] != index[:-1]])  # overlapping pieces: keep one copy of each row
        return index[first], values[first]

    @staticmethod
    def gather_rows(rows: np.ndarray, values: np.ndarray, total: int) -> np.ndarray:
        """[total, ...] on every process from each process's ``(rows, values)`` (an all-gather across processes;
        a collective: every process calls it at the same point). Every row must be held by some process."""
        full = np.zeros((total,) + values.shape[1:], values.dtype)
        held = np.zeros(total, bool)
        full[rows], held[rows] = values, True
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            all_full, all_held = multihost_utils.process_allgather((full, held))  # [processes, total, ...]
            source = np.argmax(all_held, axis=0)  # the first process holding each row
            full, held = all_full[source, np.arange(total)], all_held.any(axis=0)
        if not held.all():
            raise ValueError(f"rows {np.flatnonzero(~held)[:8].tolist()} of {total} are held by no process")
        return full


def _copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)
