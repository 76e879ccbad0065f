"""Sharded == one device on real accelerators: ``python -m benchmarks.device_check [--out result.json]``.

On the local devices (e.g. 2 GPUs) runs the tiny-but-not-trivial model's loss and gradients on one device and on
meshes data=N, expert=N (moe_implementation="expert_parallel", once per all-to-all transport: ragged and padded),
sequence=N and, with 4+ devices, a mixed one, and prints the loss and the worst per-leaf relative gradient error
(||g - g_ref|| / ||g_ref||) for each. fp32 throughout, matmuls at HIGHEST precision (no TF32), so the numbers measure
the sharding, not the arithmetic.

Then times the expert-parallel MoE layer alone (forward + backward, bf16, mesh expert=N) with each transport, dropless
and with a capacity factor: compile seconds, median milliseconds of ``--reps`` calls, and the output's relative
difference from the padded transport. A run that fails (e.g. ragged_all_to_all does not lower) prints its error and
the rest go on.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np


def _rel_errors(got, want):
    errs = []
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        errs.append(float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)))
    return max(errs)


def _error_row(row: dict, err: Exception) -> dict:
    print(f"FAILED {row}: {type(err).__name__}: {err}".splitlines()[0][:2000])
    traceback.print_exc(limit=3)
    return dict(row, error=f"{type(err).__name__}: {str(err)[:2000]}")


def _transport_label(transport: str | None, mesh) -> str:
    """What the expert-parallel MoE will use on ``mesh`` for ``transport``: "ragged", "padded", "ragged (emulated)"."""
    from sharding.expert_parallel import mesh_platform, resolve_transport

    with jax.set_mesh(mesh):
        resolved, emulated = resolve_transport(transport, mesh_platform(jax.sharding.get_abstract_mesh()))
    return resolved + (" (emulated)" if emulated else "")


def _model_case(batch: int, length: int):
    """A small M1-pattern model (2 periods of lightning + softmax; 8 experts), its params and a packed batch."""
    from m1jax.config import ModelConfig, m1_layer_types
    from m1jax.model import init_model
    from m1jax.train import split_model

    cfg = ModelConfig.tiny(vocab_size=1024, hidden_size=256, num_hidden_layers=4, layer_types=m1_layer_types(4, 2),
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=256,
                           num_local_experts=8, rotary_dim=32, block_size=64, router_aux_loss_coef=0.01)
    graphdef, params = split_model(init_model(cfg))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
    cuts = rng.integers(1, length, (batch, 1))
    segments = (np.arange(length)[None] >= cuts).astype(np.int32)  # two packed documents per row
    next_segment = np.concatenate([segments[:, 1:], segments[:, -1:]], axis=1)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
            "loss_mask": (segments == next_segment).astype(np.float32),  # no target across a document boundary
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))}
    return cfg, params, data


def _loss_and_grads(cfg, params, data, mesh=None):
    """The library's training loss (m1jax.train.lm_loss: chunked fp32-head CE + aux) and its gradients, jitted; on
    ``mesh``, params and batch placed by the sharding rules."""
    from m1jax.model import abstract_model
    from m1jax.train import TrainConfig, batch_shardings, lm_loss, split_model
    from sharding.rules import state_shardings

    graphdef, _ = split_model(abstract_model(cfg))
    n_tokens = float(data["loss_mask"].sum())
    fn = jax.value_and_grad(lambda p, b: lm_loss(p, graphdef, b, TrainConfig(), n_tokens)[0])
    if mesh is None:
        return jax.jit(fn)(params, data)
    p_sh, b_sh = state_shardings(params, mesh), batch_shardings(mesh, data["inputs"].shape, tuple(data))
    with jax.set_mesh(mesh):
        return jax.jit(fn, in_shardings=(p_sh, b_sh))(jax.device_put(params, p_sh), jax.device_put(data, b_sh))


def check_model(args, n: int) -> list[dict]:
    """One device vs the meshes: loss and worst gradient leaf error, one row per (mesh, MoE path, transport)."""
    from sharding.mesh import make_mesh

    cfg, params, data = _model_case(args.batch, args.length)
    t0 = time.perf_counter()
    loss_ref, grads_ref = _loss_and_grads(cfg, params, data)
    rows = [{"mesh": "one device", "moe": "sorted", "transport": None, "loss": float(loss_ref), "loss_rel_err": 0.0,
             "grad_max_rel_err": 0.0, "seconds": round(time.perf_counter() - t0, 1)}]
    runs = [(f"data={n}", "sorted", None), (f"expert={n}", "expert_parallel", "ragged"),
            (f"expert={n}", "expert_parallel", "padded"), (f"sequence={n}", "sorted", None)]
    if n >= 4:
        runs.append(("data=-1,expert=2,sequence=2", "expert_parallel", None))
    for spec, moe, transport in runs:
        mesh = make_mesh(spec)
        row = {"mesh": spec, "moe": moe, "transport": _transport_label(transport, mesh) if moe != "sorted" else None}
        t0 = time.perf_counter()
        try:
            loss, grads = _loss_and_grads(cfg.replace(moe_implementation=moe, moe_transport=transport), params,
                                          data, mesh=mesh)
            row.update(loss=float(loss), loss_rel_err=abs(float(loss) - float(loss_ref)) / abs(float(loss_ref)),
                       grad_max_rel_err=_rel_errors(grads, grads_ref), seconds=round(time.perf_counter() - t0, 1))
        except Exception as err:  # noqa: BLE001 -- one failed mesh must not hide the others' numbers
            row = _error_row(row, err)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _moe_inputs(tokens: int, hidden: int, ffn: int, experts: int, k: int, dtype):
    """Random x [N, D], routing (weights, experts) [N, k], expert weights, and an output cotangent [N, D]."""
    from m1jax.layers.moe import route_top_k

    keys = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(keys[0], (tokens, hidden), dtype)
    weights, chosen = route_top_k(jax.random.normal(keys[1], (tokens, experts), jnp.float32), k)
    w1, w3 = (jax.random.normal(kk, (experts, hidden, ffn), dtype) / hidden ** 0.5 for kk in keys[2:4])
    w2 = jax.random.normal(keys[4], (experts, ffn, hidden), dtype) / ffn ** 0.5
    cotangent = jax.random.normal(keys[5], (tokens, hidden), jnp.float32)
    return x, weights.astype(dtype), chosen, w1, w3, w2, cotangent


def time_moe(args, n: int) -> list[dict]:
    """Forward + backward of the expert-parallel MoE layer on mesh expert=N with each transport; median of reps."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from m1jax.layers.moe import _grouped_matmul, _swiglu
    from sharding.expert_parallel import (
        moe_expert_parallel,
    )
    from sharding.mesh import make_mesh

    mesh = make_mesh(f"expert={n}")
    x, weights, chosen, w1, w3, w2, cot = _moe_inputs(args.timing_tokens, args.timing_hidden, args.timing_ffn,
                                                      args.timing_experts, 2, jnp.bfloat16)
    rows_sh, w_sh = NamedSharding(mesh, P(("data", "expert", "sequence"))), NamedSharding(mesh, P("expert"))
    x, weights, chosen, cot = (jax.device_put(a, rows_sh) for a in (x, weights, chosen, cot))
    w1, w3, w2 = (jax.device_put(a, w_sh) for a in (w1, w3, w2))
    gmm = functools.partial(_grouped_matmul, implementation=None)

    def fwd_bwd(transport, capacity_factor, x, weights, w1, w3, w2):
        def f(x, weights, w1, w3, w2):
            y = moe_expert_parallel(x, weights, chosen, w1, w3, w2, swiglu=_swiglu, grouped_matmul=gmm,
                                    capacity_factor=capacity_factor, transport=transport)
            return jnp.sum(y * cot), y
        (_, y), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, weights, w1, w3, w2)
        return y, grads

    rows, reference = [], {}
    for capacity_factor in (None, 1.25):
        for transport in ("padded", "ragged"):
            row = {"layer": "moe fwd+bwd", "mesh": f"expert={n}", "tokens": args.timing_tokens,
                   "hidden": args.timing_hidden, "ffn": args.timing_ffn, "experts": args.timing_experts, "k": 2,
                   "dtype": "bfloat16", "capacity_factor": capacity_factor,
                   "transport": _transport_label(transport, mesh)}
            try:
                fn = jax.jit(functools.partial(fwd_bwd, transport, capacity_factor))
                with jax.set_mesh(mesh):
                    t0 = time.perf_counter()
                    y, _ = jax.block_until_ready(fn(x, weights, w1, w3, w2))
                    compile_s = time.perf_counter() - t0
                    times = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(x, weights, w1, w3, w2))
                        times.append(time.perf_counter() - t0)
                y = np.asarray(y, np.float64)
                reference.setdefault(capacity_factor, y)
                ref = reference[capacity_factor]
                row.update(compile_s=round(compile_s, 1), median_ms=round(1e3 * statistics.median(times), 3),
                           min_ms=round(1e3 * min(times), 3),
                           rel_diff_vs_padded=float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)))
            except Exception as err:  # noqa: BLE001 -- e.g. ragged_all_to_all failing to lower: report, go on
                row = _error_row(row, err)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| transport | capacity factor | median ms | min ms | compile s | rel. diff vs padded |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cf = "dropless" if r["capacity_factor"] is None else r["capacity_factor"]
        if "error" in r:
            print(f"| {r['transport']} | {cf} | failed: {r['error'][:120]} | | | |")
        else:
            print(f"| {r['transport']} | {cf} | {r['median_ms']} | {r['min_ms']} | {r['compile_s']} | "
                  f"{r['rel_diff_vs_padded']:.2e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--skip_model", action="store_true", help="only the MoE timing")
    parser.add_argument("--skip_timing", action="store_true", help="only the model check")
    parser.add_argument("--timing_tokens", type=int, default=16384, help="global tokens N (split over the devices)")
    parser.add_argument("--timing_hidden", type=int, default=1024)
    parser.add_argument("--timing_ffn", type=int, default=1024)
    parser.add_argument("--timing_experts", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # the timing's bf16 matmuls are single pass anyway
    n = jax.device_count()
    results = [] if args.skip_model else check_model(args, n)
    timing = [] if args.skip_timing else time_moe(args, n)
    report = {"devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
              "jax": jax.__version__, "batch": args.batch, "length": args.length, "results": results,
              "moe_timing": timing}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
