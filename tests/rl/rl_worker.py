"""One process of the multi-process RL check: ``python -m tests.rl.rl_worker OUT.npz MESH`` with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set (and fake CPU devices via XLA_FLAGS).

Joins the processes, runs ONE step of the toy learner (rollout + score + update) on a mesh over every process's
devices, and process 0 writes the step's record (its numbers) and the updated params (all-gathered, in tree order)
to OUT.npz.
"""
from __future__ import annotations

import sys


def run_one_step(mesh):
    """(record, params after the step) of the toy learner's first step on ``mesh``."""
    from tests.rl import toy
    learner, params = toy.learner(mesh)
    state, record = learner.step(learner.init_state(params))
    return record, state.params


def numbers(record: dict) -> dict:
    """The record's numeric entries (timings excluded: they differ from run to run)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float, list)) and not k.endswith("_s")}


def main(out_path: str, mesh_spec: str) -> None:
    from sharding.multihost import initialize
    if not initialize():
        raise SystemExit("not launched as several processes (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                         "JAX_PROCESS_ID)")
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from sharding.mesh import make_mesh
    record, params = run_one_step(make_mesh(mesh_spec))
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(multihost_utils.process_allgather(params,
                                                                                                  tiled=True))]
    if jax.process_index() == 0:
        np.savez(out_path, processes=jax.process_count(), devices=jax.device_count(),
                 **{f"r_{k}": np.asarray(v) for k, v in numbers(record).items()},
                 **{f"param_{i}": x for i, x in enumerate(leaves)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
