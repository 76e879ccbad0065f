"""Throughput and MFU of the train step (forward + backward + AdamW update) on one device.

    python -m benchmarks.train --preset=m1-1b --seq_len=8192 --batch=4 \\
        --variant="m1=" --variant="bf16_head=lm_head_fp32=false" --out=/tmp/bench_train.json

Each ``--variant`` is ``name=override;override``: ModelConfig ``key=value`` pairs on top of the preset and
``compute_dtype=bfloat16``, plus bench keys: ``batch=N`` (sequences per step, default --batch), ``accum=N``
(gradient accumulation over N micro-batches of batch/N rows: one AdamW update per N micro-batches) and ``docs=N``
(pack N documents per row: the batch then carries ``segment_ids`` and the softmax layers take the segment-masked
flash kernel; default 1 = no segment ids, cuDNN's fused attention). All variants run in one process, one after
another, on random tokens. MFU = model FLOPs per token (``m1jax.train.train_flops_per_token``: 6 x active matmul
params incl. the LM head, + lightning and causal softmax attention) x tokens/s / the device's dense bf16 datasheet
peak. A variant at a second depth (``num_hidden_layers=8``) gives the per-layer-period cost by difference.

A fourth bench key, ``breakdown=1`` (or ``--breakdown`` for the first variant), first times the variant's parts at
its shapes and settings, each against its floor (FLOPs at the bf16 peak, bytes at the HBM peak): a decoder layer of
each kind and the LM head + chunked CE (forward + backward), the AdamW + clip update (the step's optax chain, 32 bytes
per parameter) and the gradient-accumulation add (12 bytes per parameter), the last two in place on donated buffers;
the glue (embedding, final norm, layer scan, loss plumbing) is the variant's measured step minus these parts. The
breakdown tables come last but one, the variants' table last. A fifth, ``profile=1``, runs two more steps under
``jax.profiler`` after the timing and prints where their device time goes, by kind of kernel, with the heaviest
kernels.

The hidden-4096 variant (8 layers = one period, 32 heads of 128, 8 experts of 4096; 4.1B parameters, 1.56B active
with the head) is ``hidden_size=4096;num_hidden_layers=8;num_attention_heads=32;head_dim=128;num_local_experts=8;
intermediate_size=4096`` on the m1-1b preset. ``scan_layers=false`` unrolls the layer periods: at m1-1b's two
repeats it saves the scan's stacked residual and gradient buffers (``docs/training.md``).

``--head_sweep=1024:32000,4096:32000`` first times the LM head + chunked CE alone (forward + backward, the
breakdown's measurement) at each ``hidden:vocab`` and ``--head_tokens`` tokens for every head precision: fp32 operands
at ``float32`` (HIGHEST), ``bf16_3x`` (XLA's three-pass algorithm), ``bf16_3x_fused`` (split operands, one GEMM per
product) and the plain bf16 head, interleaved (``benchmarks.timing.time_round_robin``), each with its gradients'
error against the ``float32`` head's (max |d - d_float32| / max |d_float32|, for dh and dW; dh is returned in bf16,
the hidden states' dtype, so its error includes bf16 rounding flips for every head, dW's is the head's own). Without
``--variant`` only the sweep runs.

``--check_packed`` first compares, on the device, the loss and gradient norm of one packed batch through the
segment-masked flash path against the same documents as separate rows through cuDNN (a correctness check of the
packed path, which CPU tests cannot reach).
"""
from __future__ import annotations

import json
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "m1-1b", "Model preset.")
flags.DEFINE_integer("seq_len", 8192, "Tokens per sequence.")
flags.DEFINE_integer("batch", 4, "Sequences per step.")
flags.DEFINE_integer("steps", 8, "Timed steps (after the warm-up steps).")
flags.DEFINE_float("warmup_seconds", 0.0, "Warm-up steps until this many seconds have passed (at least 2, the first "
                   "compiles). 0: two steps, timed 0.4-3.4 s into the run at m1-1b's and hidden-4096's steps on an "
                   "H200; 3 s of them time a power-capped card at its sustained clock (benchmarks/RESULTS.md, "
                   "\"Burst and sustained\").", lower_bound=0.0)
flags.DEFINE_multi_string("variant", ["m1="], "name=key=value;key=value (ModelConfig overrides).")
flags.DEFINE_string("ce", "chunked", "Cross-entropy implementation: chunked | full.")
flags.DEFINE_integer("ce_chunk", 8192, "Vocabulary chunk.")
flags.DEFINE_string("out", None, "Write results as JSON here.")
flags.DEFINE_bool("check_packed", False, "Check the packed (segment ids) path against unpacked rows first.")
flags.DEFINE_list("head_sweep", [], "HIDDEN:VOCAB,...: first time the LM head + chunked CE alone at each shape for "
                  "every head precision (float32, bf16_3x, bf16_3x_fused, bf16); without --variant only this runs.")
flags.DEFINE_integer("head_tokens", 8192, "Tokens of the --head_sweep.")
flags.DEFINE_bool("breakdown", False, "First time each component of the step against its floor (fwd+bwd of a "
                  "layer of each kind, the LM head + CE, the AdamW update, the accumulation add) at the first "
                  "variant's shapes and settings; the glue is that variant's step minus the parts.")

BENCH_KEYS = ("batch", "docs", "accum", "breakdown", "profile")


def split_variant(spec: str) -> tuple[str, list[str], dict[str, int]]:
    """'name=k=v;k=v' -> (name, ModelConfig overrides, bench settings {batch, docs, accum, breakdown, profile})."""
    name, _, rest = spec.partition("=")
    overrides, bench = [], {}
    for item in (o for o in rest.split(";") if o):
        key, _, value = item.partition("=")
        if key in BENCH_KEYS:
            bench[key] = int(value)
        else:
            overrides.append(item)
    return name, overrides, bench


def make_batch(vocab: int, b: int, t: int, docs: int, seed: int = 0) -> dict:
    """Random tokens [b, t]; with docs > 1 each row packs ``docs`` equal documents (segment ids 1..docs, positions
    restarting at each document)."""
    import numpy as np

    if t % docs:
        raise ValueError(f"seq_len {t} is not a multiple of docs={docs}")
    tokens = np.random.default_rng(seed).integers(0, vocab, (b, t + 1))
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
             "loss_mask": np.ones((b, t), bool),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32) % (t // docs), (b, t)).copy()}
    if docs > 1:
        batch["segment_ids"] = np.broadcast_to(np.repeat(np.arange(1, docs + 1, dtype=np.int32), t // docs),
                                               (b, t)).copy()
        batch["loss_mask"][:, t // docs - 1::t // docs] = False  # a document's last token does not predict the next
    return batch


def _config(overrides):
    from m1jax.config import ModelConfig, apply_overrides
    return apply_overrides(ModelConfig.preset(FLAGS.preset), ["compute_dtype=bfloat16", *overrides])


def _train_config(grad_accum: int = 1):
    from m1jax import train as tl
    return tl.TrainConfig(learning_rate=1e-4, warmup_steps=0, total_steps=100, ce_chunk_size=FLAGS.ce_chunk,
                          ce_implementation=FLAGS.ce, grad_accum=grad_accum)


def check_packed(docs: int = 4, t: int = 4096) -> dict:
    """Loss and gradient of one row packing ``docs`` documents (segment-masked flash attention) against the same
    documents as ``docs`` separate rows without segment ids (cuDNN). Equal up to bf16 rounding when the packed
    path masks correctly. A leak across documents barely moves the loss of random tokens but moves the gradients:
    the same packed row with one segment (the control) shows how large that is."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m1jax import train as tl

    cfg, tc = _config([]), _train_config()
    graphdef, state = tl.create_train_state(cfg, tc)
    packed = make_batch(cfg.vocab_size, 1, t, docs, seed=1)
    n = t // docs
    rows = {k: packed[k].reshape(docs, n) for k in ("inputs", "targets", "loss_mask")}
    rows["positions"] = np.broadcast_to(np.arange(n, dtype=np.int32), (docs, n)).copy()
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, b: tl.lm_loss(p, graphdef, b, tc, jnp.sum(b["loss_mask"].astype(jnp.float32)))[0]))
    # The check discriminates only if the control is far further from the per-row reference than the packed row is.
    leaky = dict(packed, segment_ids=np.ones_like(packed["segment_ids"]))
    (loss_r, g_r), (loss_p, g_p), (loss_l, g_l) = (grad_fn(state.params, b) for b in (rows, packed, leaky))

    def rel(g):
        num = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree_util.tree_leaves(g),
                                                                jax.tree_util.tree_leaves(g_r)))
        return (num / sum(float(jnp.sum(b ** 2)) for b in jax.tree_util.tree_leaves(g_r))) ** 0.5

    out = {"check": "packed_vs_rows", "docs": docs, "seq_len": t, "loss_rows": float(loss_r),
           "loss_packed": float(loss_p), "grad_rel_err": rel(g_p),
           "loss_unmasked_control": float(loss_l), "grad_rel_err_unmasked_control": rel(g_l)}
    print(json.dumps(out), flush=True)
    return out


def _head_ce_inputs(tokens: int, hidden: int, vocab: int):
    """Random bf16 hidden states [tokens, hidden] (what the backbone hands the head), fp32 head weight [hidden, vocab]
    and targets [tokens]."""
    import jax
    import jax.numpy as jnp

    h = jax.random.normal(jax.random.key(1), (tokens, hidden), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (hidden, vocab), jnp.float32) * 0.02
    return h, w, jax.random.randint(jax.random.key(4), (tokens,), 0, vocab)


def _head_ce_grad(targets, fp32: bool, precision: str):
    """jit((h, w) -> gradients of the summed chunked CE w.r.t. h and w): the LM head + CE's forward + backward."""
    import jax
    import jax.numpy as jnp

    from m1jax.losses import linear_cross_entropy
    return jax.jit(jax.grad(lambda h, w: jnp.sum(linear_cross_entropy(
        h, w, targets, chunk_size=FLAGS.ce_chunk, fp32=fp32, fp32_precision=precision)), argnums=(0, 1)))


def head_sweep(shapes: list[str], tokens: int, reps: int = 10) -> list[dict]:
    """The LM head + chunked CE (forward + backward) at each 'hidden:vocab' for every head precision, timed
    interleaved; FLOPs = 6 x tokens x hidden x vocab (the model FLOPs: bf16_3x runs 3x that on the tensor cores,
    bf16_3x_fused 2x for the logits and dW of bf16 hidden states and 3x for dh), floor at the bf16 peak."""
    import jax
    import jax.numpy as jnp

    from benchmarks.timing import time_round_robin
    from m1jax import train as tl
    from m1jax.config import LM_HEAD_PRECISIONS

    modes = {**{p: (True, p) for p in LM_HEAD_PRECISIONS}, "bf16": (False, "float32")}
    peak, rows = tl.peak_tflops(), []
    for shape in shapes:
        hidden, vocab = (int(x) for x in shape.split(":"))
        h, w, targets = _head_ce_inputs(tokens, hidden, vocab)
        fns = {name: _head_ce_grad(targets, *mode) for name, mode in modes.items()}
        times = time_round_robin(fns, (h, w), {name: reps for name in fns})
        ref = fns["float32"](h, w)
        flops = 6.0 * tokens * hidden * vocab
        for name, fn in fns.items():
            row = {"component": f"LM head+CE {name}", "hidden": hidden, "vocab": vocab, "tokens": tokens,
                   "precision": name, "floor_ms": flops / (peak * 1e12) * 1e3 if peak else None}
            if isinstance(times[name], Exception):
                row["error"] = f"{type(times[name]).__name__}: {str(times[name])[:300]}"
            else:
                grads = fn(h, w)
                row.update(ms=times[name][0], p20_ms=times[name][1], p80_ms=times[name][2],
                           tflops=flops / times[name][0] / 1e9,
                           **{f"{k}_rel_err": float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
                                                    / jnp.max(jnp.abs(r.astype(jnp.float32))))
                              for k, g, r in zip(("dh", "dw"), grads, ref)})
                del grads
            rows.append(row)
            print(json.dumps(row), flush=True)
        del fns, ref, h, w
    return rows


def print_head_sweep(rows: list[dict]) -> None:
    print(f"{'hidden':>6} {'vocab':>6} {'tokens':>6} {'precision':14} {'ms':>8} {'TFLOP/s':>8} {'floor/ms':>8} "
          f"{'dh err':>9} {'dW err':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['hidden']:6d} {r['vocab']:6d} {r['tokens']:6d} {r['precision']:14} error: {r['error'][:80]}")
            continue
        roof = f"{r['floor_ms'] / r['ms']:8.0%}" if r["floor_ms"] else f"{'-':>8}"
        print(f"{r['hidden']:6d} {r['vocab']:6d} {r['tokens']:6d} {r['precision']:14} {r['ms']:8.2f} "
              f"{r['tflops']:8.1f} {roof} {r['dh_rel_err']:9.2e} {r['dw_rel_err']:9.2e}")


def _module_fwd_bwd(module, call, h):
    """jit(grads of <call(module, h), dy> wrt the module's params and h): one sub-layer's forward + backward."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params = nnx.split(module, nnx.Param)
    dy = jax.random.normal(jax.random.key(3), h.shape, h.dtype)

    def loss(params, h):
        out = call(nnx.merge(graphdef, params), h)
        return jnp.sum(out.astype(jnp.float32) * dy.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def _in_place_ms(fn, carry, *args, reps: int = 5):
    """(median ms, final carry) of ``carry = fn(carry, *args)`` with the carry donated (updated in place, as in the
    step)."""
    import jax

    from benchmarks.timing import timing_stats

    fn = jax.jit(fn, donate_argnums=0)
    times = []
    for i in range(reps + 2):  # two warm-up calls (the first compiles)
        t0 = time.perf_counter()
        carry = fn(carry, *args)
        jax.block_until_ready(carry)
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return timing_stats(times)[0], carry


# Bytes each fp32 parameter moves: AdamW + clip (read param, grad, m, v; write param, m, v; the global norm reads
# the grad once more) and the accumulation add (read the sum and the micro-batch's grad, write the sum).
ADAMW_BYTES_PER_PARAM = 32
ACCUM_BYTES_PER_PARAM = 12


def breakdown(b: int, overrides: list[str], accum: int) -> list[dict]:
    """Where one step's time goes, each part against its own floor, at the variant's shapes (bf16 compute, fp32
    masters; a micro-batch of b / accum rows).

    Timed alone, x their count per step: the decoder layers of each kind and the LM head + chunked CE at the
    variant's head precision (forward + backward), the AdamW + clip update (the step's optax
    chain) and the accumulation add, both on donated buffers as in
    the step. ``print_breakdown`` sets them against the variant's measured step: the rest is the glue outside the
    parts (embedding gather and its scatter-add gradient, final norm, the layer scan, loss plumbing).
    Floors: model FLOPs (6 x active matmul params per token + the attention cores, ``train_flops_per_token``'s
    terms) at the bf16 peak; the update and the add at the HBM peak (ADAMW_BYTES_PER_PARAM, ACCUM_BYTES_PER_PARAM).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from benchmarks.timing import time_ms
    from m1jax import train as tl
    from m1jax.config import LIGHTNING, SOFTMAX
    from m1jax.layers.decoder import DecoderLayer
    from m1jax.train.flops import LIGHTNING_CHUNK

    cfg, tc = _config(overrides), _train_config(accum)
    t, mb = FLAGS.seq_len, b // accum
    tokens = mb * t
    peak, bandwidth = tl.peak_tflops(), tl.peak_hbm_tbps()
    rngs = nnx.Rngs(params=0)
    h = jax.random.normal(jax.random.key(1), (mb, t, cfg.hidden_size), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (mb, t))
    n_light = sum(x == LIGHTNING for x in cfg.layer_types)
    heads = cfg.num_attention_heads * cfg.head_dim
    attention_flops = {LIGHTNING: 3.0 * 4 * heads * (LIGHTNING_CHUNK + cfg.head_dim), SOFTMAX: 3.0 * 2 * t * heads}
    rows = []

    def add(name, ms, count, flops=None, floor_bytes=None):
        floor = (flops / (peak * 1e12) if flops and peak else
                 floor_bytes / (bandwidth * 1e12) if floor_bytes and bandwidth else None)
        row = {"component": name, "ms": ms, "count": count, "ms_per_step": ms * count if count else None,
               "tflops": flops / ms / 1e9 if flops else None, "floor_ms": floor * 1e3 if floor else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def median_ms(fn, *args):
        return time_ms(fn, *args, reps=5)[0]

    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    for kind, layer_index, count in ((LIGHTNING, 0, n_light), (SOFTMAX, 7, cfg.num_hidden_layers - n_light)):
        if not count:
            continue
        module = DecoderLayer(cfg, kind, rngs=rngs)
        fn, params = _module_fwd_bwd(module, lambda m, h, i=layer_index: m(h, layer_index=i, positions=pos)[0], h)
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2)
        n_params -= (e - k) * 3 * cfg.hidden_size * cfg.intermediate_size  # only top-k experts are active per token
        add(f"{kind} layer", median_ms(fn, params, h), count * accum,
            (6.0 * n_params + attention_flops[kind]) * tokens)
        del fn, params, module
    # LM head + chunked CE at the variant's head precision. bf16_3x runs three bf16 passes, so its hardware floor
    # is 3x the model-FLOP floor shown (bf16_3x_fused: 2x for the logits and dW, 3x for dh).
    del h
    h, w, targets = _head_ce_inputs(tokens, cfg.hidden_size, cfg.vocab_size)
    add(f"LM head+CE {cfg.lm_head_precision if cfg.lm_head_fp32 else 'bf16'}",
        median_ms(_head_ce_grad(targets, cfg.lm_head_fp32, cfg.lm_head_precision), h, w), accum,
        6.0 * cfg.hidden_size * cfg.vocab_size * tokens)
    del h, w
    _, state = tl.create_train_state(cfg, tc)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), state.params)
    n = cfg.param_counts()["total"]
    # The update, in place, as the step runs it (the optax chain).
    opt = tl.make_optimizer(tc)

    def update(carry, grads):
        params, opt_state = carry
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    ms, carry = _in_place_ms(update, (state.params, state.opt_state), grads)
    del state
    add("AdamW+clip", ms, 1, floor_bytes=ADAMW_BYTES_PER_PARAM * n)
    del carry
    ms, acc = _in_place_ms(lambda acc, g: jax.tree_util.tree_map(jnp.add, acc, g),
                           jax.tree_util.tree_map(jnp.zeros_like, grads), grads)
    add("accumulation add (per micro-batch)", ms, accum if accum > 1 else None, floor_bytes=ACCUM_BYTES_PER_PARAM * n)
    del acc, grads
    return [dict(r, batch=b, seq_len=t, accum=accum) for r in rows]


def print_breakdown(rows: list[dict], step: dict | None) -> None:
    """The breakdown's table; with the variant's measured step, the glue (step - the parts) and each part's share."""
    counted = sum(r["ms_per_step"] for r in rows if r["ms_per_step"] is not None)
    if step is not None and "step_ms" in step:
        rows = rows + [{"component": "glue: step - parts", "ms": step["step_ms"] - counted, "count": 1,
                        "ms_per_step": step["step_ms"] - counted, "tflops": None, "floor_ms": None},
                       {"component": f"step ({step['variant']})", "ms": step["step_ms"], "count": 1,
                        "ms_per_step": step["step_ms"], "tflops": None, "floor_ms": None}]
    total = rows[-1]["ms_per_step"] if step is not None and "step_ms" in step else None
    print(f"{'component':36} {'ms':>8} {'x':>3} {'ms/step':>8} {'share':>6} {'TFLOP/s':>8} {'floor ms':>8} "
          f"{'floor/ms':>8}")
    for r in rows:
        per_step = r["ms_per_step"] if r["ms_per_step"] is not None else float("nan")
        share = f"{per_step / total:6.1%}" if total and r["ms_per_step"] is not None else f"{'-':>6}"
        floor = f"{r['floor_ms']:8.2f}" if r["floor_ms"] else f"{'-':>8}"
        roof = f"{r['floor_ms'] / r['ms']:8.0%}" if r["floor_ms"] and r["ms"] > 0 else f"{'-':>8}"
        print(f"{r['component']:36} {r['ms']:8.2f} {r['count'] or '':>3} {per_step:8.1f} {share} "
              f"{r['tflops'] if r['tflops'] else float('nan'):8.1f} {floor} {roof}")


def bench_variant(name: str, overrides: list[str], bench: dict) -> dict:
    import jax

    from m1jax import train as tl

    cfg, tc = _config(overrides), _train_config(bench.get("accum", 1))
    b, t, docs = bench.get("batch", FLAGS.batch), FLAGS.seq_len, bench.get("docs", 1)
    t0 = time.perf_counter()
    graphdef, state = tl.create_train_state(cfg, tc)
    step = tl.make_train_step(graphdef, tc)
    batch = jax.device_put(make_batch(cfg.vocab_size, b, t, docs))
    compiled = step.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    warmup_steps, warmup_start = 0, time.perf_counter()
    while warmup_steps < 2 or time.perf_counter() - warmup_start < FLAGS.warmup_seconds:
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        warmup_steps += 1
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / FLAGS.steps
    flops = tl.train_flops_per_token(cfg, t)
    peak = tl.peak_tflops()
    tok_s = b * t / dt
    result = {"variant": name, "overrides": overrides, "batch": b, "accum": tc.grad_accum, "docs": docs,
              "warmup_steps": warmup_steps, "step_ms": dt * 1e3, "tokens_per_s": tok_s,
              "model_tflops_per_s": flops * tok_s / 1e12, "mfu": flops * tok_s / (peak * 1e12) if peak else None,
              "gflop_per_token": flops / 1e9, "loss": float(metrics["loss"]), "compile_s": t_compile,
              "temp_gib": mem.temp_size_in_bytes / 2 ** 30 if mem else None,
              "params_total": cfg.param_counts()["total"], "active_with_head": cfg.param_counts()["active_with_head"]}
    print(json.dumps(result), flush=True)
    if bench.get("profile"):
        result["profile"] = profile_steps(compiled, state, batch)
    return result


def profile_steps(compiled, state, batch, steps: int = 2, top_n: int = 25) -> dict:
    """Two more steps under ``jax.profiler``: the device time per kind of kernel and the heaviest kernels, printed
    (``benchmarks.profiling.device_trace``)."""
    import jax

    from benchmarks.profiling import device_trace
    carry = [state]

    def run():
        carry[0], metrics = compiled(carry[0], batch)
        jax.block_until_ready(metrics)

    trace = device_trace(run, steps, top_n)
    if "error" in trace:
        print(f"  profile: {trace['error']}", flush=True)
        return trace
    print(f"  device busy {trace['device_busy_ms']:.1f} ms a step in {trace['kernels_per_step']:.0f} kernels")
    for category, c in trace["categories"].items():
        print(f"    {category:24} {c['ms']:8.2f} ms {c['calls']:7.0f} kernels")
    for k in trace["top"]:
        print(f"      {k['ms']:7.2f} ms x {k['calls']:4.0f}  {k['kernel']}")
    for name, n in trace["copies_per_step"].items():
        print(f"    {name:24} {trace['copy_ms_per_step'][name]:8.2f} ms {n:7.0f} copies")
    return trace


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; preset {FLAGS.preset}; "
          f"batch {FLAGS.batch} x {FLAGS.seq_len}; ce {FLAGS.ce}", flush=True)
    results, breakdowns, heads = [], [], []
    if FLAGS.head_sweep:
        heads = head_sweep(FLAGS.head_sweep, FLAGS.head_tokens)
    variants = FLAGS.variant if FLAGS["variant"].present or not FLAGS.head_sweep else []
    if FLAGS.check_packed:
        try:
            results.append(check_packed())
        except Exception as e:  # report and go on to the timings
            print(json.dumps({"check": "packed_vs_rows", "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
    for i, spec in enumerate(variants):
        name, overrides, bench = split_variant(spec)
        rows = None
        if bench.get("breakdown") or (FLAGS.breakdown and i == 0):
            try:
                rows = breakdown(bench.get("batch", FLAGS.batch), overrides, bench.get("accum", 1))
            except Exception as e:  # report and go on to the timings
                print(json.dumps({"breakdown": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
        try:
            results.append(bench_variant(name, overrides, bench))
        except Exception as e:  # keep going: one variant running out of memory should not lose the others
            print(json.dumps({"variant": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
            results.append({"variant": name, "error": str(e)[:400]})
        if rows:
            breakdowns.append({"variant": name, "rows": rows})
    if heads:
        print(f"-- LM head + chunked CE, forward + backward (chunk {FLAGS.ce_chunk})")
        print_head_sweep(heads)
    for b in breakdowns:
        print(f"-- breakdown of {b['variant']}")
        print_breakdown(b["rows"], next(r for r in results if r.get("variant") == b["variant"]))
    print(f"{'variant':20} {'batch':>5} {'accum':>5} {'docs':>4} {'step ms':>8} {'ms/micro':>8} {'tok/s':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {'temp GiB':>8}")
    for r in results:
        if "step_ms" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"{r['variant']:20} {r['batch']:5d} {r['accum']:5d} {r['docs']:4d} {r['step_ms']:8.1f} "
                  f"{r['step_ms'] / r['accum']:8.1f} {r['tokens_per_s']:9.0f} {r['model_tflops_per_s']:8.1f} "
                  f"{mfu:>6} {r['temp_gib'] or 0:8.1f}")
        elif "variant" in r:
            print(f"{r['variant']:20} error: {r['error'][:100]}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results,
                       "breakdowns": breakdowns, "head_sweep": heads}, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
