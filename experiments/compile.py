"""Compile m1jax's workloads for a TPU slice from this (CPU) host and report per-device memory, FLOPs, collectives.

    python -m experiments.compile --topology=v5p:2x2x1 --mesh=data=2,expert=2 --preset=tiny
    python -m experiments.compile --topology=v5p-512 --mesh=data=16,expert=8,sequence=2 --preset=m1 \\
        --set remat=true --set moe_implementation=expert_parallel --workloads=train --batch=128 --seq_len=8192 \\
        --out=/tmp/m1_v5p512.json

Needs libtpu (``pip install 'jax[tpu]==0.11.2'``, part of the ``tpu`` and ``test`` extras); no TPU. Each workload is
compiled by the real TPU compiler for the slice's devices (``m1jax.aot``); a workload that does not fit the chip's
memory is reported with its peak against the chip's HBM (exit code 1), and one the compiler refuses for memory with
the compiler's message.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

# The compiles target the slice's devices; this host's own backend stays the CPU (libtpu would look for a local TPU).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "TPU slice: a JAX topology name (v5p:2x2x1) or a slice name (v5p-512).",
                    required=True)
flags.DEFINE_string("mesh", None, "Mesh spec over the slice's devices, e.g. data=16,expert=8,sequence=2 "
                    "(default: all on data).")
flags.DEFINE_string("preset", "tiny", "Model preset, or a config file (m1jax.config.files.load_model_config).")
flags.DEFINE_multi_string("set", [], "ModelConfig override key=value (repeatable, typed).")
flags.DEFINE_list("workloads", ["train", "prefill", "decode", "rl_update"], "What to compile.")
flags.DEFINE_integer("batch", 8, "Global batch (sequences) of train and rl_update.")
flags.DEFINE_integer("seq_len", 128, "Tokens per training sequence; rl_update's prompt length.")
flags.DEFINE_integer("prefill_batch", 1, "Prompts in the prefill.")
flags.DEFINE_integer("prefill_length", 256, "Prompt tokens of the prefill.")
flags.DEFINE_integer("decode_batch", 8, "Rows of the decode step.")
flags.DEFINE_integer("decode_context", 256, "KV-cache slots of the decode step.")
flags.DEFINE_integer("new_tokens", 16, "Response tokens of rl_update rows.")
flags.DEFINE_bool("fsdp", False, "Shard parameters and optimizer state over data (and expert, sequence) too.")
flags.DEFINE_string("out", None, "Write the report as JSON here.")


def main(argv):
    from m1jax.errors import UserError, user_errors

    with user_errors():
        if len(argv) > 1:
            raise UserError(f"unexpected arguments: {argv[1:]}")
        cfg, devices, mesh = _inputs()
        _compile_all(cfg, devices, mesh)


def _inputs():
    """(model config, slice devices, mesh), every flag checked before any compile."""
    from m1jax import aot
    from m1jax.config.files import load_model_config
    from m1jax.errors import UserError
    from sharding.mesh import make_mesh

    unknown = sorted(set(FLAGS.workloads) - set(aot.WORKLOADS))
    if unknown:
        raise UserError(f"unknown workloads {unknown}; choose from {list(aot.WORKLOADS)}")
    cfg = load_model_config(FLAGS.preset).override(FLAGS.set)
    try:
        aot.topology_name(FLAGS.topology)
    except ValueError as e:
        raise UserError(str(e)) from None
    devices = aot.topology_devices(FLAGS.topology)
    try:
        mesh = make_mesh(FLAGS.mesh, devices=devices)
    except ValueError as e:
        raise UserError(f"--mesh: {e}") from None
    return cfg, devices, mesh


def _compile_all(cfg, devices, mesh):
    from m1jax import aot
    print(f"{FLAGS.topology}: {len(devices)} x {devices[0].device_kind}; mesh "
          f"{dict(zip(mesh.axis_names, mesh.axis_sizes))}; model {cfg.param_counts()['total']:,} parameters",
          flush=True)
    shapes = {"train": dict(batch=FLAGS.batch, length=FLAGS.seq_len),
              "rl_update": dict(batch=FLAGS.batch, length=FLAGS.seq_len, new_tokens=FLAGS.new_tokens),
              "prefill": dict(batch=FLAGS.prefill_batch, length=FLAGS.prefill_length),
              "decode": dict(batch=FLAGS.decode_batch, length=FLAGS.decode_context)}
    report, failed = aot.compile_workloads(cfg, mesh, {w: shapes[w] for w in FLAGS.workloads}, fsdp=FLAGS.fsdp,
                                           log=lambda line: print(line, flush=True))
    report["topology"] = FLAGS.topology
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {FLAGS.out}")
    if failed:
        print("\n".join(failed))
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
