"""Compile m1jax's workloads for a TPU slice from this (CPU) host and report per-device memory, FLOPs, collectives.

    python -m experiments.compile --topology=v5p:2x2x1 --mesh=data=2,expert=2 --preset=tiny
    python -m experiments.compile --topology=v5p-512 --mesh=data=16,expert=8,sequence=2 --preset=m1 \\
        --set remat=true --set moe_implementation=expert_parallel --workloads=train --batch=256 --seq_len=8192 \\
        --out=/tmp/m1_v5p512.json

Needs libtpu (``pip install 'jax[tpu]==0.11.2'``, part of the ``tpu`` and ``test`` extras); no TPU. Each workload is
compiled by the real TPU compiler for the slice's devices (``m1jax.aot``); a workload that does not fit the chip's
memory is reported with its peak against the chip's HBM (exit code 1), and one the compiler refuses for memory with
the compiler's message.
"""
from __future__ import annotations

import json
import os
import time

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
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from m1jax import aot
    from m1jax.config import ConfigError
    from m1jax.config.files import load_model_config
    from sharding.mesh import make_mesh

    unknown = sorted(set(FLAGS.workloads) - set(aot.WORKLOADS))
    if unknown:
        raise app.UsageError(f"unknown workloads {unknown}; choose from {list(aot.WORKLOADS)}")
    try:
        cfg = load_model_config(FLAGS.preset).override(FLAGS.set)
        aot.topology_name(FLAGS.topology)
    except (ConfigError, ValueError) as e:
        raise app.UsageError(str(e))
    devices = aot.topology_devices(FLAGS.topology)
    try:
        mesh = make_mesh(FLAGS.mesh, devices=devices)
    except ValueError as e:
        raise app.UsageError(f"--mesh: {e}")
    print(f"{FLAGS.topology}: {len(devices)} x {devices[0].device_kind}; mesh "
          f"{dict(zip(mesh.axis_names, mesh.axis_sizes))}; model {cfg.param_counts()['total']:,} parameters",
          flush=True)
    shapes = {"train": dict(batch=FLAGS.batch, length=FLAGS.seq_len),
              "rl_update": dict(batch=FLAGS.batch, length=FLAGS.seq_len, new_tokens=FLAGS.new_tokens),
              "prefill": dict(batch=FLAGS.prefill_batch, length=FLAGS.prefill_length),
              "decode": dict(batch=FLAGS.decode_batch, length=FLAGS.decode_context)}
    report = {"topology": FLAGS.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
              "mesh": dict(zip(mesh.axis_names, map(int, mesh.axis_sizes))), "fsdp": FLAGS.fsdp,
              "model": cfg.to_dict(), "workloads": {}}
    failed = []
    for workload in FLAGS.workloads:
        t0 = time.perf_counter()
        try:
            compiled = aot.lower_workload(workload, cfg, mesh, fsdp=FLAGS.fsdp, **shapes[workload]).compile()
        except Exception as e:  # noqa: BLE001 -- the compiler's refusal is the answer for this workload
            text = str(e)
            if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
                raise
            report["workloads"][workload] = {"shape": shapes[workload], "error": text[:4000]}
            failed.append(f"{workload} does not fit {devices[0].device_kind}: the TPU compiler ran out of memory: "
                          f"{text.splitlines()[0][:300]}")
            print(failed[-1], flush=True)
            continue
        entry = dict(aot.compile_report(compiled, devices[0]), shape=shapes[workload],
                     compile_seconds=round(time.perf_counter() - t0, 1))
        report["workloads"][workload] = entry
        print(_line(workload, entry), flush=True)
        if entry.get("fits") is False:
            failed.append(f"{workload} does not fit {devices[0].device_kind}: peak "
                          f"{aot.format_bytes(entry['memory']['peak_bytes'])} per device > "
                          f"{aot.format_bytes(entry['hbm_bytes'])} HBM")
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"wrote {FLAGS.out}")
    if failed:
        print("\n".join(failed))
        raise SystemExit(1)


def _line(workload: str, entry: dict) -> str:
    from m1jax.aot import format_bytes
    m = entry["memory"]
    moved = ", ".join(f"{k} {format_bytes(v)}" for k, v in entry["collectives"]["bytes"].items() if v)
    return (f"{workload:9s} peak {format_bytes(m['peak_bytes'])} (args {format_bytes(m['argument_bytes'])}, "
            f"temps {format_bytes(m['temp_bytes'])}, out {format_bytes(m['output_bytes'])}, aliased "
            f"{format_bytes(m['alias_bytes'])})  {entry['flops'] / 1e12:.3f} TFLOP  collectives: {moved or 'none'}  "
            f"[{entry['compile_seconds']}s]")


if __name__ == "__main__":
    app.run(main)
