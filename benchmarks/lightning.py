"""Lightning attention benchmark on one GPU: our Pallas-Triton kernel vs fla, the XLA chunked scan, cuDNN softmax.

Run from the repository root on a GPU machine with fla-core 0.6.0 installed (the competitor; it needs torch and triton):

    python -m benchmarks.lightning --out_dir=$OUT

Phases, all in one process so every number in the final table comes from the same card:
  1. correctness on the GPU at small shapes (odd T, segment ids, initial state; fp32 and bf16): o, final state and
     dq/dk/dv/d_init of our kernel against the per-token recurrence;
  2. tuning of our kernel's launch config (Dv tile, warps, stages, sequence groups) at the sweep shapes;
  3. timing at M1's lightning shapes (64 heads of 128; 8K to 1M tokens), forward and forward+backward, of ours (best config of the
     nearest swept shape), fla ``chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)``, the XLA chunked scan (C=64) and
     cuDNN causal softmax attention; plus ours against the XLA scan (o and gradients) at every shape.
% floor = max(FLOPs / 800 TFLOP/s, bytes / 3.0 TB/s) / t with the chunked algorithm's counts (chunk 64): forward 4BHNd(64+d) FLOPs and
8BHNd bytes; forward+backward 14BHNd(64+d) FLOPs and 22BHNd bytes. Inputs are bf16 silu(randn), d = 128, decay =
MiniMax layer-0 slopes. JAX timing: median over 5 measurements of the host wall time of n back-to-back calls
(n so that one measurement takes >= 30 ms) after two warm-ups; torch: ``triton.testing.do_bench`` median.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX's allocator keeps what it grew to; cap it so fla (torch) keeps room at 128K forward+backward.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.55")

import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from pallas_kernels.lightning import pallas, reference  # noqa: E402
from pallas_kernels.lightning.config import KernelConfig, pick_groups  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", os.environ.get("OUT", "/tmp/bench_lightning"), "where the JSON lines go")
flags.DEFINE_list("shapes", ["1x64x8192", "1x64x32768", "1x64x131072", "8x64x8192", "1x8x1048576"], "BxHxN")
flags.DEFINE_list("sweep_shapes", ["1x64x32768", "1x8x1048576"], "shapes at which our config is tuned")
flags.DEFINE_list("impls", ["ours", "fla", "xla", "cudnn"], "what to time")
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "forward, forward+backward")
flags.DEFINE_bool("check", True, "phase 1 and the per-shape comparison against the XLA scan")
flags.DEFINE_integer("cudnn_max_n", 131072, "skip cuDNN softmax above this N (1M would take seconds per call)")
flags.DEFINE_integer("head_dim", 128, "d")

# (chunk, block_v, num_warps, num_stages); sequence groups are swept separately around the automatic choice.
LAUNCH_GRID = [(64, 32, 4, 2), (64, 32, 2, 2), (64, 32, 4, 3), (64, 16, 4, 2), (64, 64, 4, 1), (64, 128, 8, 2),
               (128, 32, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)]


def minimax_slopes(heads: int) -> np.ndarray:
    """Layer-0 MiniMax decay rates: ALiBi slopes 2^(-8(h+1)/H) times (1 + 1e-5) (docs/model.md §3.2)."""
    return (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads) * (1 + 1e-5)).astype(np.float32)


def parse_shape(text: str):
    b, h, n = (int(x) for x in text.split("x"))
    return b, h, n


def floor_seconds(b, h, n, d, mode):
    flops, bytes_ = (4, 8) if mode == "fwd" else (14, 22)
    return max(flops * b * h * n * d * (64 + d) / 800e12, bytes_ * b * h * n * d / 3.0e12)


def time_jax(fn, *args) -> float:
    """Median seconds per call of a jitted ``fn`` (host wall time over back-to-back calls)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t0
    n = max(1, min(200, int(0.03 / max(once, 1e-6))))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times))


def rel_err(x, ref) -> float:
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm((x - ref).ravel()) / jnp.maximum(jnp.linalg.norm(ref.ravel()), 1e-30))


def make_inputs(key, b, h, n, d, dtype=jnp.bfloat16):
    kq, kk, kv, ko = jax.random.split(key, 4)
    q, k, v, do = (jax.nn.silu(jax.random.normal(kk_, (b, n, h, d), jnp.float32)).astype(dtype)
                   for kk_ in (kq, kk, kv, ko))
    return q, k, v, do


def ours_fn(s, config, with_bwd):
    def fwd(q, k, v):
        return pallas.lightning_attention_pallas(q, k, v, s, backend="triton", config=config)

    if not with_bwd:
        return jax.jit(fwd)
    return jax.jit(lambda q, k, v, do: jax.vjp(lambda *a: fwd(*a)[0], q, k, v)[1](do))


def xla_fn(s, with_bwd, block=64):
    def fwd(q, k, v):
        return reference.lightning_attention_chunked(q, k, v, s, block_size=block)[0]

    if not with_bwd:
        return jax.jit(fwd)
    return jax.jit(lambda q, k, v, do: jax.vjp(fwd, q, k, v)[1](do))


def cudnn_fn(with_bwd):
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    if not with_bwd:
        return jax.jit(fwd)
    return jax.jit(lambda q, k, v, do: jax.vjp(fwd, q, k, v)[1](do))


class Fla:
    """fla-core's chunk_simple_gla on the same buffers (torch views of the JAX arrays via DLPack)."""

    def __init__(self):
        import fla
        import torch
        import triton
        from fla.ops.simple_gla import chunk_simple_gla
        self.torch, self.triton, self.op = torch, triton, chunk_simple_gla
        self.versions = {"fla": fla.__version__, "torch": torch.__version__, "triton": triton.__version__}

    def tensors(self, *xs):
        return [self.torch.from_dlpack(x) for x in xs]

    def time(self, q, k, v, do, s, with_bwd) -> float:
        torch = self.torch
        q, k, v, do = self.tensors(q, k, v, do)
        g = -torch.from_dlpack(jnp.asarray(s))
        if not with_bwd:
            fn = lambda: self.op(q, k, v, g_gamma=g, scale=1.0, output_final_state=True)
        else:
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

            def fn():
                o, _ = self.op(*leaves, g_gamma=g, scale=1.0)
                o.backward(do)
        fn()
        torch.cuda.synchronize()
        ms = self.triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])[0]
        torch.cuda.empty_cache()
        return ms / 1e3

    def output(self, q, k, v, s):
        q, k, v = self.tensors(q, k, v)
        o, _ = self.op(q, k, v, g_gamma=-self.torch.from_dlpack(jnp.asarray(s)), scale=1.0)
        return jax.dlpack.from_dlpack(o.contiguous())


def check_small(log):
    """Phase 1: o, final state and all gradients against the fp32 per-token recurrence on the GPU."""
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 1000, 4, 128
    s = jnp.asarray(minimax_slopes(h) * 4)
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1))
    rows = []
    for dtype, config in ((jnp.float32, KernelConfig(groups=1)), (jnp.bfloat16, KernelConfig(groups=1)),
                          (jnp.bfloat16, KernelConfig(groups=3, block_v=128, num_warps=8))):
        q, k, v, do = make_inputs(jax.random.PRNGKey(len(rows)), b, h, t, d, dtype)
        init = jax.random.normal(jax.random.PRNGKey(7), (b, h, d, d), jnp.float32)
        d_final = jax.random.normal(jax.random.PRNGKey(8), (b, h, d, d), jnp.float32)

        def loss_of(f):
            def run(q, k, v, init):
                o, final = f(q, k, v, init)
                return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(final * d_final), (o, final)
            return jax.jit(jax.grad(run, argnums=(0, 1, 2, 3), has_aux=True))

        ours = loss_of(lambda q, k, v, i: pallas.lightning_attention_pallas(
            q, k, v, s, initial_state=i, segment_ids=seg, backend="triton", config=config))
        ref = loss_of(lambda q, k, v, i: reference.lightning_attention_recurrent(
            q, k, v, s, initial_state=i, segment_ids=seg))
        up = lambda x: x.astype(jnp.float32)
        (g_ours, (o, final)), (g_ref, (o_ref, final_ref)) = ours(q, k, v, init), ref(up(q), up(k), up(v), init)
        errs = {"o": rel_err(o, o_ref), "final": rel_err(final, final_ref)}
        errs.update({n: rel_err(a, r) for n, a, r in zip(("dq", "dk", "dv", "d_init"), g_ours, g_ref)})
        row = {"phase": "check", "dtype": jnp.dtype(dtype).name, "config": repr(config), **errs}
        log(row)
        rows.append(row)
    return rows


def sweep(shape, s_np, d, log):
    """Phase 2: forward time of each launch config (and group count) at one shape; returns the fastest config."""
    b, h, n = shape
    q, k, v, _ = make_inputs(jax.random.PRNGKey(1), b, h, n, d)
    s = jnp.asarray(s_np)
    results = []
    for chunk, block_v, warps, stages in LAUNCH_GRID:
        auto = pick_groups(b, h, n, d // block_v, chunk)
        for groups in sorted({auto, auto * 2} if auto > 1 else {1}):
            config = KernelConfig(chunk=chunk, block_v=block_v, num_warps=warps, num_stages=stages, groups=groups)
            try:
                sec = time_jax(ours_fn(s, config, False), q, k, v)
            except Exception as e:  # a config Triton cannot compile is skipped, not fatal
                log({"phase": "sweep", "shape": shape, "config": repr(config), "error": str(e)[:300]})
                continue
            log({"phase": "sweep", "shape": shape, "config": repr(config), "ms": sec * 1e3})
            results.append((sec, config))
    del q, k, v
    return min(results, key=lambda r: r[0])[1]


def compare_to_xla(s, config, with_bwd, args, fla):
    ours_out = ours_fn(s, config, with_bwd)(*args)
    ref_out = xla_fn(s, with_bwd, block=256)(*args)
    if with_bwd:
        return {f"err_{g}": rel_err(a, r) for g, a, r in zip(("dq", "dk", "dv"), ours_out, ref_out)}
    errs = {"err_o": rel_err(ours_out[0], ref_out)}
    if fla is not None:
        errs["err_fla_o"] = rel_err(fla.output(*args[:3], s), ref_out)
    return errs


def main(argv):
    del argv
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    out = open(os.path.join(FLAGS.out_dir, "bench_lightning.jsonl"), "w")

    def log(row):
        print(json.dumps(row, default=str), flush=True)
        out.write(json.dumps(row, default=str) + "\n")
        out.flush()

    d = FLAGS.head_dim
    fla = Fla() if "fla" in FLAGS.impls else None
    log({"phase": "env", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": datetime.date.today().isoformat(), **(fla.versions if fla else {})})
    if FLAGS.check:
        check_small(log)

    best = {}
    for text in FLAGS.sweep_shapes:
        shape = parse_shape(text)
        best[shape] = sweep(shape, minimax_slopes(shape[1]), d, log)
        log({"phase": "best", "shape": shape, "config": repr(best[shape])})

    table = []
    for text in FLAGS.shapes:
        b, h, n = parse_shape(text)
        # The config of the swept shape with the closest number of (b, h) walks and length.
        near = min(best, key=lambda sh: (abs(math.log(sh[0] * sh[1] / (b * h))), abs(math.log(sh[2] / n))),
                   default=None)
        config = best[near] if near else pallas.DEFAULT_CONFIGS["triton"]
        s = jnp.asarray(minimax_slopes(h))
        q, k, v, do = make_inputs(jax.random.PRNGKey(2), b, h, n, d)
        for mode in FLAGS.modes:
            with_bwd = mode == "fwdbwd"
            row = {"phase": "time", "shape": f"B{b} H{h} N{n // 1024}K", "mode": mode, "config": repr(config)}
            args = (q, k, v, do) if with_bwd else (q, k, v)
            timers = {"ours": lambda: time_jax(ours_fn(s, config, with_bwd), *args),
                      "fla": lambda: fla.time(q, k, v, do, s, with_bwd),
                      "xla": lambda: time_jax(xla_fn(s, with_bwd), *args),
                      "cudnn": lambda: time_jax(cudnn_fn(with_bwd), *args)}
            for name in FLAGS.impls:
                if name == "cudnn" and n > FLAGS.cudnn_max_n:
                    continue
                try:
                    row[f"{name}_ms"] = timers[name]() * 1e3
                except Exception as e:  # e.g. out of memory: record it and go on with the next one
                    row[f"{name}_error"] = str(e)[:200]
                    if fla is not None:
                        fla.torch.cuda.empty_cache()
            row["floor_ms"] = floor_seconds(b, h, n, d, mode) * 1e3
            if FLAGS.check:  # ours vs the XLA scan (block 256: fewer saved states) on the same inputs
                try:
                    row.update(compare_to_xla(s, config, with_bwd, args, fla))
                except Exception as e:
                    row["check_error"] = str(e)[:200]
            log(row)
            table.append(row)
        del q, k, v, do
        if fla is not None:
            fla.torch.cuda.empty_cache()

    print("\n| shape | mode | ours ms (% floor) | fla ms (% floor) | ours/fla speedup | XLA ms | cuDNN ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        pct = lambda key: f"{r[key]:.2f} ({100 * r['floor_ms'] / r[key]:.0f}%)" if key in r else "-"
        ratio = f"{r['fla_ms'] / r['ours_ms']:.2f}x" if "fla_ms" in r and "ours_ms" in r else "-"
        errs = ", ".join(f"{k[4:]} {v:.1e}" for k, v in r.items() if k.startswith("err_"))
        print(f"| {r['shape']} | {r['mode']} | {pct('ours_ms')} | {pct('fla_ms')} | {ratio} | "
              f"{r.get('xla_ms', float('nan')):.2f} | {r.get('cudnn_ms', float('nan')):.2f} | {errs} |")


if __name__ == "__main__":
    app.run(main)
