"""M1's per-device memory on a mesh of fake CPU devices, from compiled steps (``m1jax.memory_plan``).

    XLA_FLAGS=--xla_force_host_platform_device_count=128 JAX_PLATFORMS=cpu \\
        python -m experiments.plan --mesh=data=16,expert=8 --mode=train --batch=128 --length=8192 --layers=8,16
"""
from __future__ import annotations

import json

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", None, "Mesh spec, e.g. data=16,expert=8 (needs that many devices).", required=True)
flags.DEFINE_enum("mode", "train", ["train", "prefill"], "Compile the train step or the prefill forward.")
flags.DEFINE_integer("batch", 16, "Global batch.")
flags.DEFINE_integer("length", 8192, "Tokens per sequence.")
flags.DEFINE_list("layers", ["8", "16"], "Depths to compile (multiples of 8); two give the per-layer slope.")
flags.DEFINE_bool("fsdp", True, "Shard parameters and optimizer state over data (and expert, sequence) too.")
flags.DEFINE_float("capacity_factor", None, "Expert-parallel capacity factor (default: dropless).")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per train step.")
flags.DEFINE_enum("remat_granularity", "period", ["period", "layer", "nested"], "What jax.checkpoint wraps.")
flags.DEFINE_string("dump", None, "Directory for XLA dumps; prints the largest buffers live at the peak.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from m1jax.memory_plan import plan_report
    from sharding.mesh import make_mesh

    try:
        mesh = make_mesh(FLAGS.mesh)
        depths = [int(x) for x in FLAGS.layers]
    except ValueError as e:
        raise app.UsageError(str(e))
    report = plan_report(mesh, mesh_spec=FLAGS.mesh, mode=FLAGS.mode, batch=FLAGS.batch, length=FLAGS.length,
                         depths=depths, fsdp=FLAGS.fsdp, capacity_factor=FLAGS.capacity_factor,
                         grad_accum=FLAGS.grad_accum, remat_granularity=FLAGS.remat_granularity, dump=FLAGS.dump,
                         log=lambda line: print(line, flush=True))
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main)
