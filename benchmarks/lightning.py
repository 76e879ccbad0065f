"""Lightning attention benchmark on one GPU: our Pallas kernels (Triton: ``ours``; Mosaic GPU, Hopper only:
``mosaic``, whose backward at D = 128 runs in one launch; ``mosaic_paired``: the same forward, the dq walk and then
the dv and dk walks as paired programs; ``mosaic_3walks``: the backward's three separate walks) vs fla, the XLA
chunked scan, cuDNN softmax.

Run from the repository root on a GPU machine with fla-core 0.6.0 installed (the competitor; it needs torch and triton):

    python -m benchmarks.lightning --out_dir=$OUT

Phases, all in one process so every number in the final table comes from the same card:
  1. correctness on the GPU at small shapes (odd T, initial state; segment ids and fp32 for the Triton kernel): o,
     final state and dq/dk/dv/d_init of each of our kernels in ``--impls`` against the per-token recurrence;
  2. tuning of each of our kernels' launch config (chunk, Dv tile, warps, stages, sequence groups) at the sweep shapes;
  3. timing at M1's lightning shapes (64 heads of 128; 8K to 1M tokens), forward and forward+backward, of ours (best
     config of the nearest swept shape), fla ``chunk_simple_gla(q, k, v, g_gamma=-s, scale=1.0)``, the XLA chunked
     scan (C=64) and cuDNN causal softmax attention; plus ours against the XLA scan (o and gradients) at every shape.
% floor = max(FLOPs / peak FLOP/s, bytes / peak bytes/s) / t with the chunked algorithm's counts (chunk 64): forward
4BHNd(64+d) FLOPs and 8BHNd bytes; forward+backward 14BHNd(64+d) FLOPs and 22BHNd bytes. Peaks by card (``PEAKS``):
H100 800 TFLOP/s, 3.0 TB/s; H200 989 TFLOP/s, 4.8 TB/s. Inputs are bf16 silu(randn), d = 128, decay = MiniMax
layer-0 slopes. JAX timing: median over 5 measurements of the host wall time of n back-to-back calls (n so that one
measurement takes >= 30 ms) after 0.3 s of calls (``--warmup_seconds``: 3 s gives a power-capped card's sustained
speed, a few % slower than the first half second's for our kernels, ``benchmarks/RESULTS.md``); torch:
``triton.testing.do_bench`` median (``fla``), or the same pipelined host wall time as ours (``fla_pipelined``: one
protocol for both sides). ``--rounds=R`` times every implementation R times, one after the other in each round, and
reports the median round (the card's speed drifts between and within calls by up to 10%).

Mosaic vs Triton vs fla, forward only, in under five minutes (H200):

    python -m benchmarks.lightning --impls=mosaic,ours,fla --modes=fwd --shapes=1x64x32768,1x64x131072,1x8x1048576 \
        --sweep_shapes=1x64x32768 --sweep_impls=mosaic --out_dir=$OUT

(the 1M shape runs the 32K shape's fastest Mosaic config with its sequence groups scaled to as many programs).

Paired vs three-walk Mosaic backward vs fla, forward+backward:

    python -m benchmarks.lightning --impls=mosaic,mosaic_3walks,fla --modes=fwdbwd \
        --shapes=1x64x32768,1x64x131072 --sweep_shapes= --out_dir=$OUT

Each implementation's time is printed as soon as it is measured (a ``start`` row before, a ``timed`` row after).

``--impls=mosaic,floor_walk`` times the Mosaic GPU kernel next to the floor's own work (``benchmarks/floor_walk.py``:
the floor's bytes and wgmma FLOPs and nothing else, on the default's grid) and prints its speed as a share of that.

``--energy`` adds each kernel's energy per call, mean power and SM clocks from NVML (``benchmarks/power.py``; carry the
``nvidia-ml-py`` wheel): on an H200 our kernels run at the card's power limit, where the energy per call sets the time.
``--stall_seconds=S`` ends a run that logs nothing for S seconds (exit status 124, one line naming the step it was in;
``benchmarks/stall.py``): a kernel with a synchronisation bug hangs rather than fails.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# JAX's allocator keeps what it grew to; cap it so fla (torch) keeps room at 128K forward+backward.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.55")

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.power import energy_per_call, nvml_handle  # noqa: E402
from benchmarks.stall import StallWatchdog  # noqa: E402
from benchmarks.timing import jit_timed, pipelined_seconds, time_pipelined  # noqa: E402
from pallas_kernels.lightning import pallas, reference  # noqa: E402
from pallas_kernels.lightning.config import KernelConfig, pick_groups  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", os.environ.get("OUT", "/tmp/bench_lightning"), "where the JSON lines go")
flags.DEFINE_list("shapes", ["1x64x8192", "1x64x32768", "1x64x131072", "8x64x8192", "1x8x1048576"], "BxHxN")
flags.DEFINE_list("sweep_shapes", ["1x64x32768", "1x8x1048576"], "shapes at which our config is tuned")
flags.DEFINE_list("impls", ["ours", "mosaic", "fla", "xla", "cudnn"],
                  "what to time: ours (Triton kernel), mosaic (Mosaic GPU kernel), mosaic_3walks (Mosaic GPU, the "
                  "backward's dv and dk walks not paired), mosaic_paired (Mosaic GPU, the dq walk and the paired dv "
                  "and dk walk programs: the backward before the one-launch default), mosaic_unsplit (Mosaic GPU, "
                  "each walk with outputs in "
                  "one warpgroup, 4 stages, no cluster: the default before split_state), fla (do_bench), "
                  "fla_pipelined (timed as ours are), xla, "
                  "cudnn, floor_walk (the floor's bytes and wgmma FLOPs and nothing else, on the Mosaic GPU default's "
                  "grid: benchmarks/floor_walk.py; Hopper only)")
flags.DEFINE_list("sweep_impls", ["ours", "mosaic"], "which of our kernels to tune (the others run their default)")
flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "forward, forward+backward")
flags.DEFINE_bool("check", True, "phase 1 and the per-shape comparison against the XLA scan")
flags.DEFINE_list("check_impls", [], "which of our kernels phase 1 checks (empty: all of --impls)")
flags.DEFINE_bool("compare_xla", True, "with --check: compare each timed kernel against the XLA scan at every shape "
                  "(minutes at 128K forward+backward)")
flags.DEFINE_integer("cudnn_max_n", 131072, "skip cuDNN softmax above this N (1M would take seconds per call)")
flags.DEFINE_integer("head_dim", 128, "d")
flags.DEFINE_bool("energy", False, "after the timing rounds, run each of --impls' kernels (and fla) back to back "
                  "for 2 s and report its energy per call, mean power and SM clocks from NVML (benchmarks.power; "
                  "needs nvidia-ml-py)")
flags.DEFINE_float("warmup_seconds", None, "seconds of calls before each timed measurement, every implementation "
                   "(fla's do_bench included); unset: 0.3 s before ours and fla_pipelined, do_bench's 25 ms before "
                   "fla. A power-capped card slows for seconds after a run starts: 3 s measures its sustained speed",
                   lower_bound=0.0)
flags.DEFINE_float("stall_seconds", 0.0, "end the run (exit status 124, one line naming the step) once this many "
                   "seconds pass without a logged row: a kernel whose synchronisation is wrong hangs rather than "
                   "fails. 0: never. Give a new kernel's first GPU run a limit (e.g. 120; with fla, 300: its first "
                   "forward + backward autotunes Triton kernels for over 120 s on a fresh machine)", lower_bound=0.0)
flags.DEFINE_integer("rounds", 1, "time every implementation this many times, interleaved; the median is reported",
                     lower_bound=1)

# Our kernels: --impls name -> pallas backend.
KERNELS = {"ours": "triton", "mosaic": "mosaic_gpu", "mosaic_3walks": "mosaic_gpu",
           "mosaic_unsplit": "mosaic_gpu", "mosaic_paired": "mosaic_gpu"}
WALKS3, UNSPLIT, PAIRED = "mosaic_3walks", "mosaic_unsplit", "mosaic_paired"
# The one-launch backward whose dq walk restarts from the forward's states every M chunks (``dq_checkpoints``; the
# default's M is ``pallas.MOSAIC_DQ_CHECKPOINTS``), or (M = 0) runs forward from the start.
CHECKPOINTED = {f"mosaic_ckpt{m}": m for m in (0, 2, 4, 8, 16)}
KERNELS.update({name: "mosaic_gpu" for name in CHECKPOINTED})


def keep_checkpoints_where_taken(config: KernelConfig) -> KernelConfig:
    """``config`` without ``dq_checkpoints`` where its backward no longer takes them (they need the one-launch
    backward, ``fused_backward`` = 2, and split walks): for the variants and sweep configs derived from the default."""
    taken = config.fused_backward == 2 and config.split_state
    return config if taken else dataclasses.replace(config, dq_checkpoints=0)


# Variants of the Mosaic GPU kernel (not swept): their config from mosaic's (swept or default) one.
MOSAIC_VARIANTS = {name: (lambda c, f=f: keep_checkpoints_where_taken(f(c))) for name, f in {
    WALKS3: lambda c: dataclasses.replace(c, fused_backward=0),
    # The backward as before the one-launch default: the dq walk, then the paired dv and dk walks.
    PAIRED: lambda c: dataclasses.replace(c, fused_backward=min(c.fused_backward, 1)),
    # The one-warpgroup walks in the default's own stages (the sequence-split regime's config is unsplit already).
    UNSPLIT: lambda c: c if not c.split_state else dataclasses.replace(
        c, split_state=0, multicast=0, num_stages=pallas.DEFAULT_CONFIGS["mosaic_gpu"].num_stages),
    **{name: (lambda c, m=m: dataclasses.replace(c, dq_checkpoints=m)) for name, m in CHECKPOINTED.items()},
}.items()}
# Triton: (chunk, block_v, num_warps, num_stages); sequence groups are swept separately around the automatic choice.
LAUNCH_GRIDS = {
    "triton": [(64, 32, 4, 2), (64, 32, 2, 2), (64, 32, 4, 3), (64, 16, 4, 2), (64, 64, 4, 1), (64, 128, 8, 2),
               (128, 32, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)],
}
# Mosaic GPU: (chunk, block_v, consumers, num_stages, groups, split_state, multicast), groups given for 64 (row, head)
# walks (M1's 64 heads at batch 1) and scaled to the shape's (``scale_groups``); the rest of each config is the
# default's fitted to the shape (the paired backward). consumers 0: one warpgroup per program (the first H200 run's
# best, 128-wide tiles at 8 groups; the 1-group 64-wide tiles it did not try; 32-wide tiles, 2 programs per SM);
# 1: a producer warpgroup issues the TMA loads (slots refilled as soon as they are read); 2: two consumer warpgroups
# walk the two halves of a 64- or 128-wide Dv tile and share its q/k loads (one program per SM: shared memory).
# 1 group avoids the state pass's extra k, v read (+50% traffic: with it the forward cannot get under 67% of the
# memory floor), and at 64 (row, head) walks 128 programs then need 64-wide programs. Chunk 128 is left out: its
# [128, 128] fp32 scores and decay table alone take 256 registers per thread. split_state 1: the state chain in a
# warpgroup of its own (the default since the eighth session), with or without a head's tiles as one cluster.
MOSAIC_SWEEP = [(64, 128, 0, 2, 8, 0, 0), (64, 64, 0, 2, 1, 0, 0), (64, 64, 0, 3, 1, 0, 0), (64, 64, 0, 4, 1, 0, 0),
                (64, 32, 0, 2, 1, 0, 0), (64, 64, 1, 3, 1, 0, 0), (64, 64, 1, 4, 1, 0, 0),
                (64, 32, 2, 2, 1, 0, 0), (64, 32, 2, 3, 1, 0, 0), (64, 32, 2, 4, 1, 0, 0),
                (64, 64, 2, 3, 1, 0, 0),
                (64, 64, 2, 2, 2, 0, 0), (64, 64, 2, 3, 2, 0, 0), (64, 64, 2, 3, 4, 0, 0), (64, 32, 2, 3, 2, 0, 0),
                (64, 64, 0, 3, 1, 1, 0), (64, 64, 0, 4, 1, 1, 0), (64, 64, 0, 2, 1, 1, 1), (64, 64, 0, 3, 1, 1, 1),
                (64, 64, 0, 4, 1, 1, 1), (64, 64, 0, 3, 2, 1, 1)]
# device_kind substring -> (peak dense bf16 FLOP/s, peak HBM bytes/s) for % floor; the first match wins.
PEAKS = {"H200": (989e12, 4.8e12), "H100": (800e12, 3.0e12)}


def minimax_slopes(heads: int) -> np.ndarray:
    """Layer-0 MiniMax decay rates: ALiBi slopes 2^(-8(h+1)/H) times (1 + 1e-5) (docs/model.md §3.2)."""
    return (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads) * (1 + 1e-5)).astype(np.float32)


def parse_shape(text: str):
    b, h, n = (int(x) for x in text.split("x"))
    return b, h, n


def peaks(device_kind: str):
    return next((p for key, p in PEAKS.items() if key in device_kind), PEAKS["H100"])


def floor_seconds(b, h, n, d, mode, peak=PEAKS["H100"]):
    flops, bytes_ = (4, 8) if mode == "fwd" else (14, 22)
    return max(flops * b * h * n * d * (64 + d) / peak[0], bytes_ * b * h * n * d / peak[1])


def rel_err(x, ref) -> float:
    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm((x - ref).ravel()) / jnp.maximum(jnp.linalg.norm(ref.ravel()), 1e-30))


def make_inputs(key, b, h, n, d, dtype=jnp.bfloat16):
    kq, kk, kv, ko = jax.random.split(key, 4)
    q, k, v, do = (jax.nn.silu(jax.random.normal(kk_, (b, n, h, d), jnp.float32)).astype(dtype)
                   for kk_ in (kq, kk, kv, ko))
    return q, k, v, do


def ours_fn(s, config, with_bwd, backend="triton"):
    def fwd(q, k, v):
        return pallas.lightning_attention_pallas(q, k, v, s, backend=backend, config=config)

    return jit_timed(fwd, with_bwd, output=lambda out: out[0])


def xla_fn(s, with_bwd, block=64):
    def fwd(q, k, v):
        return reference.lightning_attention_chunked(q, k, v, s, block_size=block)[0]

    return jit_timed(fwd, with_bwd)


def cudnn_fn(with_bwd):
    def fwd(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return jit_timed(fwd, with_bwd)


def floor_walk_fn(s, config, d, with_bwd):
    """``benchmarks.floor_walk``'s pass at the Mosaic GPU kernel's chunk, tile, stages and cluster (``config``), over
    whole rows (it has no sequence groups)."""
    from benchmarks.floor_walk import floor_pass_fn
    return floor_pass_fn(s, d, with_bwd, chunk=config.chunk, block_v=min(config.block_v, d),
                         stages=config.num_stages, cluster=bool(config.multicast))


def warmup_kwargs(warmup_seconds) -> dict:
    """``benchmarks.timing``'s warm-up argument for ``--warmup_seconds`` (None: its default)."""
    return {} if warmup_seconds is None else {"warmup_seconds": warmup_seconds}


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

    def call(self, q, k, v, do, s, with_bwd):
        """fla's forward (or forward + backward) on these inputs as a function of nothing."""
        torch = self.torch
        q, k, v, do = self.tensors(q, k, v, do)
        g = -torch.from_dlpack(jnp.asarray(s))
        if not with_bwd:
            return lambda: self.op(q, k, v, g_gamma=g, scale=1.0, output_final_state=True)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

        def fn():
            o, _ = self.op(*leaves, g_gamma=g, scale=1.0)
            o.backward(do)
        return fn

    def wait(self, _=None):
        self.torch.cuda.synchronize()

    def time(self, q, k, v, do, s, with_bwd, pipelined=False, warmup_seconds=None) -> float:
        """Seconds per call: ``do_bench``'s median (events around each call, L2 flushed before it), or with
        ``pipelined`` the host wall time of back-to-back calls, as ``benchmarks.timing.time_pipelined`` times ours;
        ``warmup_seconds`` of calls before either (None: each one's default)."""
        fn = self.call(q, k, v, do, s, with_bwd)
        fn()
        self.wait()
        if pipelined:
            sec = pipelined_seconds(fn, self.wait, **warmup_kwargs(warmup_seconds))
        else:
            warmup_ms = 25 if warmup_seconds is None else warmup_seconds * 1e3
            sec = self.triton.testing.do_bench(fn, warmup=warmup_ms, rep=100, quantiles=[0.5, 0.2, 0.8])[0] / 1e3
        self.torch.cuda.empty_cache()
        return sec

    def output(self, q, k, v, s):
        q, k, v = self.tensors(q, k, v)
        o, _ = self.op(q, k, v, g_gamma=-self.torch.from_dlpack(jnp.asarray(s)), scale=1.0)
        return jax.dlpack.from_dlpack(o.contiguous())


def check_small(log, impls=("ours",), shape=(2, 1000, 4)):
    """Phase 1: o, final state and all gradients against the fp32 per-token recurrence on the GPU; shape (B, T, H)."""
    rng = np.random.default_rng(0)
    (b, t, h), d = shape, 128
    s = jnp.asarray(minimax_slopes(h) * 4)
    segments = jnp.asarray(np.sort(rng.integers(0, 4, (b, t)), axis=1))
    # The Mosaic default as fitted to M1's B1 H64 32K (a head's two tiles as a cluster, in its stages): this small
    # shape would get the sequence-split regime's config.
    fitted = pallas.default_config("mosaic_gpu", jnp.bfloat16, 1, 64, 1 << 15, d, d)
    cases = {"ours": [(jnp.float32, KernelConfig(groups=1), True), (jnp.bfloat16, KernelConfig(groups=1), True),
                        (jnp.bfloat16, KernelConfig(groups=3, block_v=128, num_warps=8), True)],
             # No segment ids (the kernel does not take them); 1000 tokens = 15 full chunks and a partial one.
             "mosaic": [(jnp.bfloat16, dataclasses.replace(fitted, groups=1), False),
                            (jnp.bfloat16, dataclasses.replace(fitted, groups=3), False),
                            (jnp.bfloat16, KernelConfig(chunk=128, block_v=64, num_stages=2, groups=1), False),
                            # Warp-specialized: producer + 1 or 2 consumer warpgroups (2: 32- and 64-wide halves).
                            (jnp.bfloat16, KernelConfig(block_v=64, consumers=1, num_stages=3, groups=1), False),
                            (jnp.bfloat16, KernelConfig(block_v=32, consumers=2, num_stages=3, groups=1), False),
                            (jnp.bfloat16, KernelConfig(block_v=64, consumers=2, num_stages=2, groups=3), False)],
             # The three separate backward walks (the default pairs the dv and dk walks), with and without a split.
             WALKS3: [(jnp.bfloat16, MOSAIC_VARIANTS[WALKS3](dataclasses.replace(fitted, groups=g)), False)
                      for g in (1, 3)],
             UNSPLIT: [(jnp.bfloat16, MOSAIC_VARIANTS[UNSPLIT](dataclasses.replace(fitted, groups=g)), False)
                       for g in (1, 3)],
             PAIRED: [(jnp.bfloat16, MOSAIC_VARIANTS[PAIRED](dataclasses.replace(fitted, groups=1)), False)],
             **{name: [(jnp.bfloat16, MOSAIC_VARIANTS[name](dataclasses.replace(fitted, groups=1)), False)]
                for name in CHECKPOINTED}}
    rows = []
    for impl, dtype, config, with_segments in [(name, *c) for name in impls for c in cases[name]]:
        backend = KERNELS[impl]
        seg = segments if with_segments else None
        q, k, v, do = make_inputs(jax.random.PRNGKey(len(rows)), b, h, t, d, dtype)
        init = jax.random.normal(jax.random.PRNGKey(7), (b, h, d, d), jnp.float32)
        d_final = jax.random.normal(jax.random.PRNGKey(8), (b, h, d, d), jnp.float32)

        def loss_of(f):
            def run(q, k, v, init):
                o, final = f(q, k, v, init)
                return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32)) + jnp.sum(final * d_final), (o, final)
            return jax.jit(jax.grad(run, argnums=(0, 1, 2, 3), has_aux=True))

        ours = loss_of(lambda q, k, v, i: pallas.lightning_attention_pallas(
            q, k, v, s, initial_state=i, segment_ids=seg, backend=backend, config=config))
        ref = loss_of(lambda q, k, v, i: reference.lightning_attention_recurrent(
            q, k, v, s, initial_state=i, segment_ids=seg))
        up = lambda x: x.astype(jnp.float32)
        row = {"phase": "check", "impl": impl, "dtype": jnp.dtype(dtype).name, "segments": with_segments,
               "config": repr(config)}
        log({**row, "phase": "start", "time": datetime.datetime.now().isoformat(timespec="seconds")})
        try:
            (g_ours, (o, final)), (g_ref, (o_ref, final_ref)) = ours(q, k, v, init), ref(up(q), up(k), up(v), init)
        except Exception as e:  # a kernel that does not compile fails its check; the timings still run
            log({**row, "ok": False, "error": str(e)[:1000]})
            rows.append({**row, "ok": False})
            continue
        errs = {"o": rel_err(o, o_ref), "final": rel_err(final, final_ref)}
        errs.update({n: rel_err(a, r) for n, a, r in zip(("dq", "dk", "dv", "d_init"), g_ours, g_ref)})
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4  # the CPU tests' tolerances
        row.update(errs, ok=max(errs.values()) <= tol)
        log(row)
        rows.append(row)
    return rows


def scale_groups(groups: int, walks_from: int, walks_to: int, n: int, chunk: int) -> int:
    """Sequence groups for ``walks_to`` (batch * heads) walks that give as many programs as ``groups`` did for
    ``walks_from``, each group at least 64 chunks long (``pick_groups``'s rule)."""
    return max(1, min(groups * walks_from // walks_to, n // (chunk * 64)))


def launch_configs(backend, b, h, n, d):
    """The configs ``sweep`` times at shape (b, h, n) and head dim d."""
    if backend == "mosaic_gpu":
        base = pallas.default_config(backend, jnp.bfloat16, b, h, n, d, d)
        return [keep_checkpoints_where_taken(dataclasses.replace(
                    base, chunk=c, block_v=bv, consumers=w, num_stages=st, split_state=sp, multicast=mc,
                    groups=scale_groups(g, 64, b * h, n, c)))
                for c, bv, w, st, g, sp, mc in MOSAIC_SWEEP]
    configs = []
    for chunk, block_v, warps, stages in LAUNCH_GRIDS[backend]:
        auto = pick_groups(b, h, n, d // block_v, chunk)
        for groups in sorted({auto, auto * 2} if auto > 1 else {1}):
            configs.append(KernelConfig(chunk=chunk, block_v=block_v, num_warps=warps, num_stages=stages,
                                        groups=groups))
    return configs


def sweep(shape, s_np, d, log, backend="triton"):
    """Phase 2: forward time of each launch config (and group count) at one shape; returns the fastest config."""
    b, h, n = shape
    q, k, v, _ = make_inputs(jax.random.PRNGKey(1), b, h, n, d)
    s = jnp.asarray(s_np)
    results = []
    for config in launch_configs(backend, b, h, n, d):
        try:
            sec = time_pipelined(ours_fn(s, config, False, backend), q, k, v)
        except Exception as e:  # a config the compiler rejects is skipped, not fatal
            log({"phase": "sweep", "backend": backend, "shape": shape, "config": repr(config), "error": str(e)[:300]})
            continue
        log({"phase": "sweep", "backend": backend, "shape": shape, "config": repr(config), "ms": sec * 1e3})
        results.append((sec, config))
    del q, k, v
    return min(results, key=lambda r: r[0])[1] if results else pallas.DEFAULT_CONFIGS[backend]


def compare_to_xla(s, configs, with_bwd, args, fla):
    """Errors of each of our kernels (``configs``: --impls name -> config) and fla against the XLA scan."""
    ref_out = xla_fn(s, with_bwd, block=256)(*args)
    errs = {}
    for name, config in configs.items():
        try:
            out = ours_fn(s, config, with_bwd, KERNELS[name])(*args)
        except Exception as e:  # reported in the row; the other kernels still get checked
            errs[f"{name}_check_error"] = str(e)[:200]
            continue
        if with_bwd:  # (o, (dq, dk, dv))
            errs.update({f"err_{name}_{g}": rel_err(a, r) for g, a, r in zip(("dq", "dk", "dv"), out[1], ref_out[1])})
        else:
            errs[f"err_{name}_o"] = rel_err(out[0], ref_out)
    if fla is not None and not with_bwd:
        errs["err_fla_o"] = rel_err(fla.output(*args[:3], s), ref_out)
    return errs


def print_table(table):
    """The markdown table: each timed implementation's ms (% floor), the speedups of ours over fla, the errors."""
    names = [n for n in ("mosaic", PAIRED, UNSPLIT, WALKS3, "ours", "floor_walk", "fla", "fla_pipelined", "xla",
                         "cudnn")
             if any(f"{n}_ms" in r for r in table)]
    label = {WALKS3: "mosaic 3 bwd walks", UNSPLIT: "mosaic unsplit", PAIRED: "mosaic paired", "mosaic": "mosaic",
             "ours": "triton", "floor_walk": "floor walk",
             "fla": "fla", "fla_pipelined": "fla pipelined", "xla": "XLA", "cudnn": "cuDNN softmax"}
    ratios = [(a, b) for a, b in (("mosaic", "floor_walk"), ("mosaic", PAIRED), ("mosaic", UNSPLIT),
                                  ("mosaic", WALKS3), ("mosaic", "fla"),
                                  ("mosaic", "fla_pipelined"), (WALKS3, "fla"),
                                  ("ours", "fla"), ("mosaic", "ours")) if a in names and b in names]
    head = ([f"{label[n]} ms (% floor)" for n in names] + [f"{label[a]} vs {label[b]}" for a, b in ratios]
            + ["rel. errors vs XLA scan"])
    print("\n| shape | mode | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for r in table:
        pct = lambda n: f"{r[n + '_ms']:.3f} ({100 * r['floor_ms'] / r[n + '_ms']:.0f}%)" if n + "_ms" in r else "-"
        speed = lambda a, b: (f"{r[b + '_ms'] / r[a + '_ms']:.2f}x" if a + "_ms" in r and b + "_ms" in r else "-")
        errs = ", ".join(f"{k[4:]} {v:.1e}" for k, v in r.items() if k.startswith("err_"))
        cells = [pct(n) for n in names] + [speed(a, b) for a, b in ratios] + [errs]
        print(f"| {r['shape']} | {r['mode']} | " + " | ".join(cells) + " |")


def print_energy_table(table):
    """Each implementation's energy per call, mean power and SM clocks (``--energy``)."""
    print("\n| shape | mode | impl | ms | mJ per call | W | SM MHz median (min) | power-capped samples |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        for key, e in ((k, v) for k, v in r.items() if k.endswith("_energy")):
            print(f"| {r['shape']} | {r['mode']} | {key[:-len('_energy')]} | {e['ms']:.3f} | {e['mJ_per_call']:.0f} | "
                  f"{e['W']:.0f} | {e['sm_mhz_median']} ({e['sm_mhz_min']}) | {100 * e['power_capped']:.0f}% |")


def describe(row: dict) -> str:
    """A logged row in a few words (what a stalled run was doing)."""
    return " ".join(f"{key}={row[key]}" for key in ("phase", "impl", "shape", "mode", "round", "config") if key in row)


def main(argv):
    del argv
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    out = open(os.path.join(FLAGS.out_dir, "bench_lightning.jsonl"), "w")
    watchdog = StallWatchdog(FLAGS.stall_seconds)

    def log(row):
        print(json.dumps(row, default=str), flush=True)
        out.write(json.dumps(row, default=str) + "\n")
        out.flush()
        watchdog.beat(describe(row))

    with watchdog:
        run(log)


def run(log):
    """The phases (module docstring), every row through ``log``."""
    if unknown := sorted(set(FLAGS.check_impls) - set(KERNELS)):
        raise app.UsageError(f"--check_impls takes our kernels ({', '.join(KERNELS)}); got {unknown}")
    nvml = nvml_handle() if FLAGS.energy else None
    if FLAGS.energy and nvml is None:
        raise app.UsageError("--energy reads NVML: install nvidia-ml-py, on a machine with an NVIDIA GPU")
    d = FLAGS.head_dim
    fla = Fla() if {"fla", "fla_pipelined"} & set(FLAGS.impls) else None
    device_kind = jax.devices()[0].device_kind
    peak = peaks(device_kind)
    kernels = [name for name in FLAGS.impls if name in KERNELS]
    log({"phase": "env", "device": device_kind, "peaks": peak, "jax": jax.__version__,
         "warmup_seconds": FLAGS.warmup_seconds,
         "date": datetime.date.today().isoformat(), **(fla.versions if fla else {})})
    checks = check_small(log, impls=FLAGS.check_impls or kernels) if FLAGS.check else []

    best = {name: {} for name in kernels}  # impl -> swept shape -> fastest config
    for text in FLAGS.sweep_shapes:
        shape = parse_shape(text)
        for name in (n for n in kernels if n in FLAGS.sweep_impls and n not in MOSAIC_VARIANTS):
            best[name][shape] = sweep(shape, minimax_slopes(shape[1]), d, log, KERNELS[name])
            log({"phase": "best", "impl": name, "shape": shape, "config": repr(best[name][shape])})

    table = []
    for text in FLAGS.shapes:
        b, h, n = parse_shape(text)
        configs = {}
        for name in kernels:
            # The config of the swept shape with the closest number of (b, h) walks and length (the Mosaic variants:
            # mosaic's).
            swept = best.get("mosaic" if name in MOSAIC_VARIANTS else name, {})
            near = min(swept, key=lambda sh: (abs(math.log(sh[0] * sh[1] / (b * h))), abs(math.log(sh[2] / n))),
                       default=None)
            config = swept[near] if near else pallas.default_config(KERNELS[name], jnp.bfloat16, b, h, n, d, d)
            if near and config.groups:  # as many programs as at the swept shape
                config = dataclasses.replace(config, groups=scale_groups(
                    config.groups, near[0] * near[1], b * h, n, config.chunk))
            if name in MOSAIC_VARIANTS:
                config = MOSAIC_VARIANTS[name](config)
            configs[name] = config
        s = jnp.asarray(minimax_slopes(h))
        q, k, v, do = make_inputs(jax.random.PRNGKey(2), b, h, n, d)
        for mode in FLAGS.modes:
            with_bwd = mode == "fwdbwd"
            row = {"phase": "time", "shape": f"B{b} H{h} N{n // 1024}K", "mode": mode,
                   **{f"{name}_config": repr(c) for name, c in configs.items()}}
            args = (q, k, v, do) if with_bwd else (q, k, v)
            warmup = FLAGS.warmup_seconds
            timers = {"fla": lambda: fla.time(q, k, v, do, s, with_bwd, warmup_seconds=warmup),
                      "fla_pipelined": lambda: fla.time(q, k, v, do, s, with_bwd, pipelined=True,
                                                        warmup_seconds=warmup),
                      "xla": lambda: time_pipelined(xla_fn(s, with_bwd), *args, **warmup_kwargs(warmup)),
                      "cudnn": lambda: time_pipelined(cudnn_fn(with_bwd), *args, **warmup_kwargs(warmup))}
            floor_config = pallas.default_config("mosaic_gpu", jnp.bfloat16, b, h, n, d, d)
            timers["floor_walk"] = lambda: time_pipelined(floor_walk_fn(s, floor_config, d, with_bwd), *args,
                                                          **warmup_kwargs(warmup))
            for name in kernels:
                timers[name] = functools.partial(
                    lambda c, be: time_pipelined(ours_fn(s, c, with_bwd, be), *args, **warmup_kwargs(warmup)),
                    configs[name], KERNELS[name])
            rounds = {}
            for round_ in range(FLAGS.rounds):
                for name in FLAGS.impls:
                    if (name == "cudnn" and n > FLAGS.cudnn_max_n) or f"{name}_error" in row:
                        continue
                    # Logged before and after, so that a slow or hung implementation shows in the output at once.
                    log({"phase": "start", "shape": row["shape"], "mode": mode, "impl": name, "round": round_,
                         "time": datetime.datetime.now().isoformat(timespec="seconds")})
                    try:
                        rounds.setdefault(name, []).append(timers[name]() * 1e3)
                        log({"phase": "timed", "shape": row["shape"], "mode": mode, "impl": name, "round": round_,
                             "ms": rounds[name][-1]})
                    except Exception as e:  # e.g. out of memory: record it and go on with the next one
                        row[f"{name}_error"] = str(e)[:200]
                        log({"phase": "timed", "shape": row["shape"], "mode": mode, "impl": name,
                             "error": row[f"{name}_error"]})
                        if fla is not None:
                            fla.torch.cuda.empty_cache()
            if FLAGS.energy:
                energy_calls = {name: (lambda fn=ours_fn(s, configs[name], with_bwd, KERNELS[name]): fn(*args),
                                       jax.block_until_ready) for name in kernels}
                if "floor_walk" in FLAGS.impls:
                    energy_calls["floor_walk"] = (
                        lambda fn=floor_walk_fn(s, floor_config, d, with_bwd): fn(*args), jax.block_until_ready)
                if "fla" in FLAGS.impls:
                    energy_calls["fla"] = (fla.call(q, k, v, do, s, with_bwd), fla.wait)
                for name, (call, wait) in energy_calls.items():
                    if f"{name}_error" not in row:
                        row[f"{name}_energy"] = energy_per_call(call, wait, nvml=nvml)
                        log({"phase": "energy", "shape": row["shape"], "mode": mode, "impl": name,
                             **row[f"{name}_energy"]})
            for name, ms in rounds.items():
                row[f"{name}_ms"] = float(np.median(ms))
                if FLAGS.rounds > 1:
                    row[f"{name}_rounds_ms"] = ms
            row["floor_ms"] = floor_seconds(b, h, n, d, mode, peak) * 1e3
            if FLAGS.check and FLAGS.compare_xla:  # ours vs the XLA scan (block 256: fewer saved states), same inputs
                log({"phase": "start", "shape": row["shape"], "mode": mode, "impl": "compare_xla",
                     "time": datetime.datetime.now().isoformat(timespec="seconds")})
                try:
                    row.update(compare_to_xla(s, configs, with_bwd, args, fla))
                except Exception as e:
                    row["check_error"] = str(e)[:200]
            log(row)
            table.append(row)
        del q, k, v, do
        if fla is not None:
            fla.torch.cuda.empty_cache()
    print_table(table)
    if FLAGS.energy:
        print_energy_table(table)
    for impl in sorted({r["impl"] for r in checks}):
        rows = [r for r in checks if r["impl"] == impl]
        errors = [v for r in rows for k, v in r.items() if k in ("o", "final", "dq", "dk", "dv", "d_init")]
        verdict = "ok" if all(r["ok"] for r in rows) else "FAILED (see the check rows above)"
        worst = f"{max(errors):.1e}" if errors else "-"
        print(f"GPU check vs the per-token recurrence, {impl}: {verdict} (largest rel. error {worst})")


if __name__ == "__main__":
    app.run(main)
