"""Ahead-of-time compiles for TPU slices from this CPU host (m1jax.aot, experiments.compile), with libtpu."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax import aot
from m1jax.config import ModelConfig
from sharding.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def v5p_devices():
    return aot.topology_devices("v5p:2x2x1")


@pytest.mark.parametrize("name, want", [("v5p:2x2x1", ("v5p:2x2x1", 1)), ("v5p-8", ("v5p:2x2x1", 1)),
                                        ("v5p-512", ("v5p:4x8x8", 1)), ("v5p-1024", ("v5p:8x8x8", 1)),
                                        ("v6e-256", ("v6e:16x16", 1)), ("v6e-256x2", ("v6e:16x16", 2)),
                                        ("v5litepod-16", ("v5e:4x4", 1)), ("v4-8", ("v4:2x2x1", 1))])
def test_slice_names(name, want):
    assert aot.topology_name(name) == want


def test_two_slices_give_twice_the_devices():
    devices = aot.topology_devices("v5p-8x2")
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}


@pytest.mark.parametrize("name, message", [("v7x-8", "slice name"), ("v5p-6", "come in sizes"), ("v5p", "slice name")])
def test_bad_slice_names_say_what_is_valid(name, message):
    with pytest.raises(ValueError, match=message):
        aot.topology_name(name)


def test_collective_bytes_count_loop_iterations(v5p_devices):
    """A psum of a [64, 128] f32 array (32 KiB) over 4 devices: once outside a loop, and 5 times inside a scan."""
    mesh = make_mesh("data=4", devices=v5p_devices)
    x = jax.ShapeDtypeStruct((4 * 64, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))

    def step(y):  # each device adds the all-reduced sum of its [64, 128] block to that block
        return jax.shard_map(lambda a: a + jax.lax.psum(a, "data"), mesh=mesh, in_specs=P("data"),
                             out_specs=P("data"))(y)

    def once(x):
        return step(x)

    def looped(x):  # the loop carries the result, so the all-reduce cannot be hoisted out of it
        return jax.lax.fori_loop(0, 5, lambda i, y: step(y) * 0.5, x)

    with jax.set_mesh(mesh):
        counts = [aot.collective_bytes(jax.jit(f).lower(x).compile().as_text()) for f in (once, looped)]
    assert counts[0]["bytes"]["all-reduce"] == 64 * 128 * 4
    assert counts[1]["bytes"]["all-reduce"] == 5 * 64 * 128 * 4 and counts[1]["unknown_trip_counts"] == 0


def test_tiny_train_step_compiles_for_v5p_with_expert_and_sequence_axes(v5p_devices):
    """16 layers (two scanned repeats of the 8-layer period) against 8 (one): the collective bytes follow the loop's
    trip count, so the MoE's all-to-all bytes double (XLA's own FLOP count does not: it counts the body once)."""
    mesh = make_mesh("expert=2,sequence=2", devices=v5p_devices)
    reports = {}
    for layers in (8, 16):
        cfg = ModelConfig.tiny(compute_dtype="bfloat16", moe_implementation="expert_parallel",
                               num_hidden_layers=layers)
        compiled = aot.lower_workload("train", cfg, mesh, batch=4, length=64).compile()
        reports[layers] = aot.compile_report(compiled, v5p_devices[0])
    report = reports[16]
    assert report["fits"] and report["memory"]["peak_bytes"] > report["memory"]["argument_bytes"] > 0
    # Expert parallelism moves tokens with all-to-all; sequence parallelism gathers states and keys.
    assert report["collectives"]["bytes"]["all-to-all"] > 0
    assert report["collectives"]["bytes"]["all-gather"] > 0
    assert report["collectives"]["unknown_trip_counts"] == 0 and report["xla_flops"] > 0
    # measured 2.02 (the MoE dispatch of every layer, forward and backward, plus a little outside the loop)
    ratio = report["collectives"]["bytes"]["all-to-all"] / reports[8]["collectives"]["bytes"]["all-to-all"]
    assert 1.9 < ratio < 2.1, ratio


def test_compile_entry_point_end_to_end(tmp_path):
    out = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "experiments.compile", "--topology=v5p-8", "--mesh=data=2,expert=2",
                           "--preset=tiny", "--set=moe_implementation=expert_parallel", "--workloads=decode,prefill",
                           f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["devices"] == 4 and report["mesh"]["expert"] == 2
    for workload in ("decode", "prefill"):
        entry = report["workloads"][workload]
        assert entry["fits"] and entry["memory"]["peak_bytes"] > 0 and entry["xla_flops"] > 0
    assert "decode" in proc.stdout and "peak" in proc.stdout


def test_compile_entry_point_refuses_bad_input():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for args, message in ((["--topology=v5p-6"], "come in sizes"), (["--topology=v5p-8", "--mesh=data=3"],
                                                                      "--mesh"),
                          (["--topology=v5p-8", "--workloads=serve"], "unknown workloads")):
        proc = subprocess.run([sys.executable, "-m", "experiments.compile", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        # a usage error (exit 2) with its one-line message, not a crash
        assert proc.returncode == 2 and message in proc.stderr + proc.stdout, (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-1500:])
