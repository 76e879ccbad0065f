"""One process of the multi-process check: ``python -m tests.sharding.distributed_worker OUT.npz MESH`` with
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set (and fake CPU devices via XLA_FLAGS).

Joins the processes through ``sharding.multihost.initialize``, builds the tiny model's loss and gradients on a mesh
over every process's devices, gathers them, and process 0 writes them (flattened in tree order) to OUT.npz.
"""
from __future__ import annotations

import sys


def main(out_path: str, mesh_spec: str) -> None:
    from sharding.multihost import initialize
    if not initialize():
        raise SystemExit("not launched as several processes (set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                         "JAX_PROCESS_ID)")
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    from tests import tiny_model as H
    from sharding.mesh import make_mesh
    from sharding.rules import batch_sharding, state_shardings

    cfg = H.tiny_config()
    graphdef, params = H.init(cfg)
    tokens, segments = H.batch(cfg)
    mesh = make_mesh(mesh_spec)
    p_sh = state_shardings(params, mesh)
    b_sh = batch_sharding(mesh, tokens.shape)

    def place(x, sharding):  # every process holds the whole host array; each puts its own devices' pieces
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    fn = jax.value_and_grad(lambda p, t, s: H.lm_loss(p, graphdef, t, s))
    jitted = jax.jit(fn, in_shardings=(p_sh, b_sh, b_sh), out_shardings=(NamedSharding(mesh, P()), p_sh))
    with jax.set_mesh(mesh):
        loss, grads = jitted(jax.tree_util.tree_map(place, params, p_sh), place(tokens, b_sh),
                             place(segments, b_sh))
    grads = multihost_utils.process_allgather(grads, tiled=True)
    if jax.process_index() == 0:
        leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
        np.savez(out_path, loss=np.asarray(loss.addressable_data(0)),  # replicated: any local copy
                 processes=jax.process_count(), devices=jax.device_count(),
                 **{f"g{i}": g for i, g in enumerate(leaves)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
