"""Several processes (hosts) as one program: start-up, each process's share of a global batch, agreed decisions.

* ``initialize(coordinator_address, num_processes, process_id)``: ``jax.distributed.initialize`` from explicit
  arguments (the entry points' ``--coordinator_address``, ``--num_processes``, ``--process_id``), else from the
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables, else JAX's own cluster detection
  (SLURM, Open MPI, a multi-host TPU slice). One process alone is left alone. Must run before any JAX computation.
* ``local_rows(sharding, global_shape)``: the rows of a global batch that this process's devices hold, so that a data
  loader reads only those; ``global_array(local, sharding, global_shape)`` assembles the global array from them.
* ``any_process(flag)``: True on every process when it is True on any; loops use it to stop (preemption, a
  non-finite loss) at the same step everywhere.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np

_CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MEGASCALE_NUM_SLICES")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None) -> bool:
    """Join the other processes of this program (see the module docstring); returns whether several are running.

    Raises ValueError naming what is missing when some but not all of the explicit settings are given.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
        coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
        num_processes = int(env["JAX_NUM_PROCESSES"]) if env.get("JAX_NUM_PROCESSES") else num_processes
        process_id = int(env["JAX_PROCESS_ID"]) if env.get("JAX_PROCESS_ID") else process_id
        if local_device_ids is None and env.get("JAX_LOCAL_DEVICE_IDS"):
            local_device_ids = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(f"multi-process start-up needs coordinator_address, num_processes and process_id; "
                             f"missing {missing}")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, num_processes={num_processes}), got {process_id}")
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
        return True
    several = any(int(env.get(k, "1") or 1) > 1 for k in _CLUSTER_ENV)
    several |= len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    if several:
        jax.distributed.initialize()
        return True
    return False


def local_rows(sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> np.ndarray:
    """Sorted global row indices (axis 0) of ``global_shape`` that this process's devices hold under ``sharding``.

    With the batch split over processes these are a contiguous block; rows replicated across processes (a mesh axis
    spanning hosts that does not split the batch) appear on each process that needs them.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    return np.asarray(sorted(rows), np.int64)


def global_array(local: np.ndarray, sharding: jax.sharding.Sharding, global_shape: Sequence[int]) -> jax.Array:
    """The global array whose rows ``local_rows(sharding, global_shape)`` are ``local`` (this process's rows, in
    that order); each device gets its piece from them (``jax.make_array_from_callback``), whatever the layout."""
    global_shape = tuple(global_shape)
    rows = local_rows(sharding, global_shape)
    if local.shape != (len(rows), *global_shape[1:]):
        raise ValueError(f"this process holds rows {rows[:4].tolist()}... of {global_shape}: expected local data of "
                         f"shape {(len(rows), *global_shape[1:])}, got {local.shape}")
    position = np.full(global_shape[0], -1, np.int64)
    position[rows] = np.arange(len(rows))

    def piece(index):
        wanted = np.arange(global_shape[0])[index[0]]
        return local[position[wanted]][(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(global_shape, sharding, piece)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is True on any process (a collective: every process must call it at the same point)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
    return bool(np.any(flags))
