"""MoE grouped-matmul benchmark on one GPU: our Pallas-Triton kernel vs tokamax vs ``jax.lax.ragged_dot`` vs dense.

Run from the repository root on a GPU machine (tokamax 0.0.17 installed for its column; it is optional):

    python -m benchmarks.moe --out_dir=$OUT

Phases, all in one process so every number in the final table comes from the same card:
  1. correctness on the GPU: a small skewed case with rows in no group against the fp32 per-group reference
     (values, d_lhs, d_rhs), then the full shapes against ``ragged_dot``;
  2. tile tuning of each of our three kernels (forward, d_lhs, d_rhs) over a small grid, per shape;
  3. timing of every implementation at the MiniMax MoE shapes, uniform and skewed groups, forward and
     forward+backward, next to a dense matmul of the same FLOPs (the roof);
  4. the whole MoE layer (``m1jax.layers.moe``: fp32 router, top-k, sorted dispatch, three grouped matmuls, SwiGLU,
     unsort and weighted combine) forward and forward+backward (grads of x, the router and the three expert
     weights) with each grouped-matmul implementation, next to the same FLOPs as three dense matmuls (the roof):
     how much of the layer's time the dispatch around the kernels costs.
``--phases`` picks among ``kernels`` (1-3) and ``layer`` (4).
TFLOP/s = 2*M*K*N / t forward and 3 * 2*M*K*N / t forward+backward (d_lhs and d_rhs cost one forward each).
Timing: median host wall time over ``--reps`` calls, each followed by ``block_until_ready``, after two warm-ups;
the implementations of one (shape, groups, mode) are timed round-robin, one call each per round.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import time_ms, time_round_robin  # noqa: E402
from pallas_kernels.gmm import TileConfig, Tiling, backends, grouped_matmul, pallas_triton, reference  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", os.environ.get("OUT", "/tmp/bench_moe"), "where the JSON lines and the log go")
flags.DEFINE_integer("num_tokens", 32768, "M: rows of lhs (tokens x top-k)")
flags.DEFINE_integer("num_groups", 32, "G: experts")
flags.DEFINE_list("shapes", ["up", "down"], "up = [M, 6144] x [G, 6144, 9216]; down = [M, 9216] x [G, 9216, 6144]")
flags.DEFINE_list("groups", ["uniform", "skewed"], "group-size distributions")
flags.DEFINE_list("impls", ["pallas_triton", "tokamax", "ragged_dot", "dense"],
                  "what to time; tokamax also gives tokamax_raw (its ragged_dot without our adapter)")
flags.DEFINE_bool("tune", True, "tune our kernels' tiles per shape before timing")
flags.DEFINE_integer("reps", 10, "timed calls per measurement (ragged_dot: 3)")
flags.DEFINE_bool("ragged_dot_bwd", False,
                  "also time ragged_dot forward+backward (its dense rewrite ran out of memory on an 80 GB H100)")
flags.DEFINE_integer("hidden", 6144, "model width (K of the up-projection)")
flags.DEFINE_integer("expert_hidden", 9216, "expert width (N of the up-projection)")
flags.DEFINE_float("tune_budget_s", 100.0, "per shape: stop trying further tiles after this long")
flags.DEFINE_list("phases", ["kernels", "layer"], "kernels: phases 1-3; layer: the MoE layer (phase 4)")
flags.DEFINE_integer("layer_tokens", 16384, "tokens through the MoE layer (rows of the grouped matmuls: x top_k)")
flags.DEFINE_integer("top_k", 2, "experts per token in the layer phase")
flags.DEFINE_bool("interpret", False, "Pallas interpret mode: a CPU dry run of this script at tiny sizes")

# Tuning grids (block_m, block_k, block_n, group_m, num_warps, num_stages). The forward and d_lhs kernels are
# the same kernel (d_lhs reads rhs transposed); d_rhs reduces over rows, so its block_m is the reduction step.
GMM_GRID = [
    (128, 64, 256, 8, 8, 3),
    (128, 64, 128, 8, 4, 4),
    (128, 64, 256, 8, 8, 4),
    (256, 64, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 3),
    (128, 64, 256, 16, 8, 3),
]
TGMM_GRID = [
    (64, 128, 256, 1, 8, 3),
    (64, 128, 256, 1, 8, 4),
    (64, 256, 128, 1, 8, 3),
    (64, 128, 128, 1, 8, 3),
    (32, 128, 256, 1, 8, 4),
    (128, 128, 128, 1, 8, 3),
    (64, 128, 128, 1, 4, 4),
]


def _tile(spec) -> TileConfig:
    bm, bk, bn, gm, warps, stages = spec
    return TileConfig(block_m=bm, block_k=bk, block_n=bn, group_m=gm, num_warps=warps, num_stages=stages)


def group_sizes_for(kind: str, num_tokens: int, num_groups: int) -> np.ndarray:
    """uniform: equal sizes; skewed: Zipf-like (largest about 4x the mean), two empty groups, shuffled."""
    if kind == "uniform":
        sizes = np.full(num_groups, num_tokens // num_groups)
    elif kind == "skewed":
        rng = np.random.default_rng(0)
        weights = (np.arange(num_groups) + 1.0) ** -0.6
        weights[-2:] = 0.0
        weights = rng.permutation(weights)
        sizes = np.floor(num_tokens * weights / weights.sum()).astype(np.int64)
    else:
        raise ValueError(f"unknown group distribution {kind!r}")
    sizes[np.argmax(sizes)] += num_tokens - sizes.sum()
    return sizes.astype(np.int32)


def with_backward(forward):
    """fn(lhs, rhs, dout) -> (out, d_lhs, d_rhs): one forward+backward step."""
    def step(lhs, rhs, dout):
        out, vjp = jax.vjp(forward, lhs, rhs)
        return (out, *vjp(dout))
    return step


def rel_err(x, ref) -> float:
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


class Recorder:
    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "bench_moe.jsonl")
        self.rows = []
        open(self.path, "w").close()

    def add(self, **row):
        row["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def check_small_case(rec: Recorder, tiling: Tiling):
    """Real lowering on the GPU vs the fp32 reference: ragged M, K, N, empty groups and rows in no group."""
    m, k, n = 1000, 200, 328
    sizes = jnp.asarray([0, 301, 7, 0, 488, 150], jnp.int32)       # 54 rows in no group
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (sizes.shape[0], k, n), jnp.float32).astype(jnp.bfloat16)
    dout = jax.random.normal(keys[2], (m, n), jnp.float32).astype(jnp.bfloat16)
    ref = with_backward(lambda x, w: reference.grouped_matmul(x, w, sizes, jnp.float32))(lhs, rhs, dout.astype(jnp.float32))
    impls = [i for i in ("pallas_triton", "tokamax", "ragged_dot") if i in FLAGS.impls and available(i)]
    for impl in impls:
        fwd = lambda x, w, impl=impl: grouped_matmul(x, w, sizes, implementation=impl, tiling=tiling,
                                                     preferred_element_type=jnp.float32)
        try:
            got = jax.jit(with_backward(fwd))(lhs, rhs, dout.astype(jnp.float32))
        except Exception as e:  # noqa: BLE001  (record and go on to the timings)
            rec.add(phase="check_small", impl=impl, error=repr(e)[:300], ok=False)
            continue
        errs = [rel_err(g, r) for g, r in zip(got, ref)]
        tail_max = float(jnp.max(jnp.abs(got[0][int(sizes.sum()):])))
        rec.add(phase="check_small", impl=impl, rel_err_out=errs[0], rel_err_dlhs=errs[1], rel_err_drhs=errs[2],
                max_abs_tail=tail_max, ok=bool(max(errs) < 2e-2 and tail_max == 0.0))


def make_inputs(m: int, k: int, n: int, g: int):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    # Scaled so that bf16 outputs stay O(1): timing on zeros hides unwritten outputs and can run faster than real data.
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(keys[1], (g, k, n), jnp.bfloat16) * (k ** -0.5)).astype(jnp.bfloat16)
    dout = jax.random.normal(keys[2], (m, n), jnp.bfloat16)
    return jax.block_until_ready((lhs, rhs, dout))


def available(impl: str) -> bool:
    return impl != "tokamax" or backends.tokamax_module() is not None


def tune(rec: Recorder, shape: str, lhs, rhs, dout, sizes) -> Tiling:
    """Times each kernel alone over its grid; returns the fastest tile per kernel (defaults if all fail)."""
    out_dtype = lhs.dtype
    kernels = {
        "fwd": (GMM_GRID, lambda t: jax.jit(lambda x, w, s: pallas_triton.gmm(x, w, s, out_dtype=out_dtype, tile=t,
                                                                               interpret=FLAGS.interpret)),
                (lhs, rhs, sizes)),
        "dlhs": (GMM_GRID, lambda t: jax.jit(lambda dy, w, s: pallas_triton.gmm(dy, w, s, out_dtype=out_dtype, tile=t,
                                                                                 transpose_rhs=True,
                                                                                 interpret=FLAGS.interpret)),
                 (dout, rhs, sizes)),
        "drhs": (TGMM_GRID, lambda t: jax.jit(lambda x, dy, s: pallas_triton.tgmm(x, dy, s, out_dtype=out_dtype,
                                                                                   tile=t, interpret=FLAGS.interpret)),
                 (lhs, dout, sizes)),
    }
    m, k = lhs.shape
    n = rhs.shape[2]
    best = {}
    start = time.perf_counter()
    for name, (grid, build, args) in kernels.items():
        for i, spec in enumerate(grid):
            tile = _tile(spec)
            if i and time.perf_counter() - start > FLAGS.tune_budget_s:  # keep the lease: first tile only
                rec.add(phase="tune", shape=shape, kernel=name, tile=dataclasses.asdict(tile), skipped="budget")
                continue
            try:
                ms, _, _ = time_ms(build(tile), *args, reps=5)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile, e.g. out of shared memory)
                rec.add(phase="tune", shape=shape, kernel=name, tile=dataclasses.asdict(tile), error=repr(e)[:300])
                continue
            tflops = 2 * m * k * n / ms / 1e9
            rec.add(phase="tune", shape=shape, kernel=name, tile=dataclasses.asdict(tile), ms=ms, tflops=tflops)
            if name not in best or ms < best[name][0]:
                best[name] = (ms, tile)
    tiling = Tiling(**{name: tile for name, (_, tile) in best.items()})
    rec.add(phase="tuned", shape=shape, tiling=dataclasses.asdict(tiling))
    return tiling


def implementations(tiling: Tiling | None, sizes):
    """name -> forward fn(lhs, rhs) (bf16 out) for every requested implementation that is available."""
    fns = {}
    if "dense" in FLAGS.impls:  # first, so that every other row can be given as a fraction of it
        fns["dense"] = lambda x, w: jnp.dot(x, w[0])   # [M, K] x [K, N]: the same 2*M*K*N FLOPs
    for impl in FLAGS.impls:
        if impl != "dense" and available(impl):
            fns[impl] = lambda x, w, impl=impl: grouped_matmul(x, w, sizes, implementation=impl, tiling=tiling)
        if impl == "tokamax" and available(impl):
            fns["tokamax_raw"] = lambda x, w: backends.tokamax_module().ragged_dot(x, w, sizes)
        if impl == "pallas_triton" and tiling != Tiling():
            fns["pallas_triton_untuned"] = lambda x, w: grouped_matmul(x, w, sizes, implementation="pallas_triton")
    return fns


def moe_layer_fn(implementation: str | None, top_k: int):
    """(x, gate, w1, w3, w2) -> y [N, D] bf16: the model's MoE layer math (``m1jax.layers.moe``); "dense" is the
    roof: the same FLOPs as three dense matmuls over N*k rows, no routing."""
    from m1jax.layers import moe

    def layer(x, gate, w1, w3, w2):
        if implementation == "dense":
            xs = jnp.repeat(x, top_k, axis=0)                      # [N*k, D]: the rows the experts see
            h = moe._swiglu(xs @ w1[0], xs @ w3[0]).astype(x.dtype)
            return (h @ w2[0]).reshape(x.shape[0], top_k, -1).sum(1).astype(x.dtype)
        logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), gate, precision=jax.lax.Precision.HIGHEST)
        weights, experts = moe.route_top_k(logits, top_k)
        y = moe.moe_sorted(x, weights.astype(x.dtype), experts, w1, w3, w2, implementation=implementation)
        return y.astype(x.dtype)
    return layer


def bench_layer(rec: Recorder) -> list[dict]:
    """Phase 4: the MoE layer forward and forward+backward per grouped-matmul implementation."""
    n, d, f, e, k = FLAGS.layer_tokens, FLAGS.hidden, FLAGS.expert_hidden, FLAGS.num_groups, FLAGS.top_k
    keys = jax.random.split(jax.random.PRNGKey(2), 6)
    x = jax.random.normal(keys[0], (n, d), jnp.bfloat16)
    gate = jax.random.normal(keys[1], (d, e), jnp.float32) * d ** -0.5
    w1, w3 = ((jax.random.normal(kk, (e, d, f), jnp.bfloat16) * d ** -0.5).astype(jnp.bfloat16) for kk in keys[2:4])
    w2 = (jax.random.normal(keys[4], (e, f, d), jnp.bfloat16) * f ** -0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[5], (n, d), jnp.bfloat16)
    args = jax.block_until_ready((x, gate, w1, w3, w2))
    impls = ["dense"] + [i for i in FLAGS.impls if i != "dense" and available(i)]
    layers = {impl: moe_layer_fn(impl, k) for impl in impls}
    if "pallas_triton" in layers and "ragged_dot" in layers:
        ours, ref = (jax.jit(layers[i])(*args) for i in ("pallas_triton", "ragged_dot"))
        rec.add(phase="layer_check", rel_err_vs_ragged_dot=rel_err(ours, ref))
        del ours, ref
    flops = 3 * 2 * n * k * d * f
    rows, roof = [], {}
    for mode in ("fwd", "fwd+bwd"):
        if mode == "fwd":
            timed = {i: jax.jit(fn) for i, fn in layers.items()}
            call_args = args
        else:
            def fwd_bwd(fn):
                def step(x, gate, w1, w3, w2, dy):
                    y, vjp = jax.vjp(fn, x, gate, w1, w3, w2)
                    return y, vjp(dy)
                return jax.jit(step)
            timed = {i: fwd_bwd(fn) for i, fn in layers.items()
                     if not (i == "ragged_dot" and not FLAGS.ragged_dot_bwd)}
            call_args = (*args, dy)
        reps = {i: 3 if i == "ragged_dot" else FLAGS.reps for i in timed}
        for impl, result in time_round_robin(timed, call_args, reps).items():
            if isinstance(result, Exception):
                rec.add(phase="layer", mode=mode, impl=impl, error=repr(result)[:300])
                continue
            ms = result[0]
            tflops = flops * (1 if mode == "fwd" else 3) / ms / 1e9
            if impl == "dense":
                roof[mode] = ms
            row = dict(phase="layer", mode=mode, impl=impl, tokens=n, top_k=k, ms=ms, p20=result[1], p80=result[2],
                       tflops=tflops, vs_dense=roof[mode] / ms if mode in roof else None)
            rec.add(**row)
            rows.append(row)
    return rows


def main(argv):
    del argv
    rec = Recorder(FLAGS.out_dir)
    dev = jax.devices()[0]
    versions = {"jax": jax.__version__, "device": dev.device_kind, "platform": dev.platform}
    tk = backends.tokamax_module()
    versions["tokamax"] = getattr(tk, "__version__", "installed") if tk else "not importable"
    rec.add(phase="env", argv=" ".join(sys.argv), **versions)
    m, g = FLAGS.num_tokens, FLAGS.num_groups

    unknown = sorted(set(FLAGS.phases) - {"kernels", "layer"})
    if unknown:
        raise app.UsageError(f"unknown --phases {unknown}; choose from kernels, layer")
    summary = []
    if "kernels" in FLAGS.phases:
        check_small_case(rec, Tiling())
    for shape in (FLAGS.shapes if "kernels" in FLAGS.phases else []):
        k, n = {"up": (FLAGS.hidden, FLAGS.expert_hidden), "down": (FLAGS.expert_hidden, FLAGS.hidden)}[shape]
        lhs, rhs, dout = make_inputs(m, k, n, g)
        flops = 2 * m * k * n
        tiling = Tiling()
        if FLAGS.tune and "pallas_triton" in FLAGS.impls:
            tiling = tune(rec, shape, lhs, rhs, dout, jnp.asarray(group_sizes_for("uniform", m, g)))
        for kind in FLAGS.groups:
            sizes_np = group_sizes_for(kind, m, g)
            sizes = jnp.asarray(sizes_np)
            fns = implementations(tiling, sizes)
            if "ragged_dot" in fns and "pallas_triton" in fns:  # full-size agreement with XLA's ragged_dot
                ours = jax.jit(fns["pallas_triton"])(lhs, rhs)
                rec.add(phase="check_full", shape=shape, groups=kind,
                        rel_err_vs_ragged_dot=rel_err(ours, jax.jit(fns["ragged_dot"])(lhs, rhs)),
                        rel_err_tokamax_vs_ragged_dot=(rel_err(jax.jit(fns["tokamax"])(lhs, rhs),
                                                               jax.jit(fns["ragged_dot"])(lhs, rhs))
                                                       if "tokamax" in fns else None))
                del ours
            dense_tflops = {}
            for mode in ("fwd", "fwd+bwd"):
                mode_flops = flops * (1 if mode == "fwd" else 3)
                timed = {impl: jax.jit(fwd) if mode == "fwd" else jax.jit(with_backward(fwd))
                         for impl, fwd in fns.items()
                         if not (impl == "ragged_dot" and mode == "fwd+bwd" and not FLAGS.ragged_dot_bwd)}
                args = (lhs, rhs) if mode == "fwd" else (lhs, rhs, dout)
                reps = {impl: 3 if impl == "ragged_dot" else FLAGS.reps for impl in timed}
                for impl, result in time_round_robin(timed, args, reps).items():
                    if isinstance(result, Exception):
                        rec.add(phase="time", shape=shape, groups=kind, mode=mode, impl=impl, error=repr(result)[:300])
                        continue
                    ms, p20, p80 = result
                    tflops = mode_flops / ms / 1e9
                    if impl == "dense":
                        dense_tflops[mode] = tflops
                    row = dict(phase="time", shape=shape, groups=kind, mode=mode, impl=impl, ms=ms, p20=p20, p80=p80,
                               tflops=tflops, vs_dense=tflops / dense_tflops[mode] if mode in dense_tflops else None,
                               max_group=int(sizes_np.max()), min_group=int(sizes_np.min()))
                    rec.add(**row)
                    summary.append(row)
        del lhs, rhs, dout

    print("\n== grouped matmul, M=%d G=%d bf16, %s, jax %s, tokamax %s" % (m, g, versions["device"], versions["jax"],
                                                                           versions["tokamax"]))
    print(f"{'shape':6} {'groups':8} {'mode':8} {'impl':22} {'ms':>9} {'TFLOP/s':>8} {'vs dense':>8}")
    for r in summary:
        vs = f"{r['vs_dense']:.1%}" if r["vs_dense"] is not None else "-"
        print(f"{r['shape']:6} {r['groups']:8} {r['mode']:8} {r['impl']:22} {r['ms']:9.2f} {r['tflops']:8.1f} {vs:>8}")
    if "layer" in FLAGS.phases:
        layer_rows = bench_layer(rec)
        print(f"\n== MoE layer, {FLAGS.layer_tokens} tokens x top-{FLAGS.top_k}, D={FLAGS.hidden} "
              f"F={FLAGS.expert_hidden} E={FLAGS.num_groups}, bf16 (TFLOP/s of the expert matmuls; 'vs dense' = dense-roof time / time)")
        print(f"{'mode':8} {'impl':22} {'ms':>9} {'TFLOP/s':>8} {'vs dense':>8}")
        for r in layer_rows:
            vs = f"{r['vs_dense']:.1%}" if r["vs_dense"] is not None else "-"
            print(f"{r['mode']:8} {r['impl']:22} {r['ms']:9.2f} {r['tflops']:8.1f} {vs:>8}")


if __name__ == "__main__":
    app.run(main)
