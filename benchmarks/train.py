"""Throughput and MFU of the train step (forward + backward + AdamW update) on one device.

    python -m benchmarks.train --preset=m1-1b --seq_len=8192 --batch=4 \\
        --variant="m1=" --variant="bf16_head=lm_head_fp32=false" --out=/tmp/bench_train.json

Each ``--variant`` is ``name=override;override``: ModelConfig ``key=value`` pairs on top of the preset and
``compute_dtype=bfloat16``, plus three bench keys: ``batch=N`` (sequences per step, default --batch), ``accum=N``
(gradient accumulation over N micro-batches of batch/N rows: one AdamW update per N micro-batches) and ``docs=N``
(pack N documents per row: the batch then carries ``segment_ids`` and the softmax layers take the segment-masked
flash kernel; default 1 = no segment ids, cuDNN's fused attention). All variants run in one process, one after
another, on random tokens. MFU = model FLOPs per token (``m1jax.train.train_flops_per_token``: 6 x active matmul
params incl. the LM head, + lightning and causal softmax attention) x tokens/s / the device's dense bf16 datasheet
peak. A variant at a second depth (``num_hidden_layers=8``) gives the per-layer-period cost by difference.

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
flags.DEFINE_integer("steps", 8, "Timed steps (after 2 warm-up steps).")
flags.DEFINE_multi_string("variant", ["m1="], "name=key=value;key=value (ModelConfig overrides).")
flags.DEFINE_string("ce", "chunked", "Cross-entropy implementation: chunked | full.")
flags.DEFINE_integer("ce_chunk", 8192, "Vocabulary chunk.")
flags.DEFINE_string("out", None, "Write results as JSON here.")
flags.DEFINE_bool("check_packed", False, "Check the packed (segment ids) path against unpacked rows first.")
flags.DEFINE_bool("breakdown", False, "Time each component of the step (fwd+bwd of one layer of each kind, the "
                  "attention and MoE sub-layers, the LM head + CE, the AdamW update) at the preset's shapes.")

BENCH_KEYS = ("batch", "docs", "accum")


def split_variant(spec: str) -> tuple[str, list[str], dict[str, int]]:
    """'name=k=v;k=v' -> (name, ModelConfig overrides, bench settings {batch, docs})."""
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


def breakdown(b: int) -> list[dict]:
    """Where one step's time goes: each component's fwd+bwd timed alone at the variant's shapes (bf16 compute,
    fp32 masters), x its count per step, against the whole step. Components overlap nothing in the real step, so
    the sum should come near the step time; the rest is fusion differences and the embedding/norm/residual glue."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from benchmarks.timing import time_ms
    from m1jax import train as tl
    from m1jax.config import LIGHTNING, SOFTMAX
    from m1jax.layers.attention import SoftmaxAttention
    from m1jax.layers.decoder import DecoderLayer
    from m1jax.layers.lightning import LightningAttention
    from m1jax.layers.moe import MoE
    from m1jax.losses import linear_cross_entropy

    cfg, tc = _config([]), _train_config()
    t = FLAGS.seq_len
    tokens = b * t
    rngs = nnx.Rngs(params=0)
    h = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    n_light = sum(x == LIGHTNING for x in cfg.layer_types)
    n_soft = cfg.num_hidden_layers - n_light
    parts = {
        "lightning layer": (DecoderLayer(cfg, LIGHTNING, rngs=rngs), lambda m, h: m(h, layer_index=0, positions=pos)[0],
                            n_light),
        "softmax layer": (DecoderLayer(cfg, SOFTMAX, rngs=rngs), lambda m, h: m(h, layer_index=7, positions=pos)[0],
                          n_soft),
        "  lightning attn": (LightningAttention(cfg, rngs=rngs), lambda m, h: m(h, 0)[0], None),
        "  softmax attn": (SoftmaxAttention(cfg, rngs=rngs), lambda m, h: m(h, pos)[0], None),
        "  MoE": (MoE(cfg, rngs=rngs), lambda m, h: m(h)[0], None),
    }
    rows = []

    def add(name, ms, count, flops=None):
        row = {"component": name, "ms": ms, "count": count, "ms_per_step": ms * count if count else None,
               "tflops": flops / ms / 1e9 if flops else None}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def median_ms(fn, *args):
        return time_ms(fn, *args, reps=5)[0]

    for name, (module, call, count) in parts.items():
        fn, params = _module_fwd_bwd(module, call, h)
        n_params = sum(x.size for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2)
        if isinstance(module, MoE) or isinstance(module, DecoderLayer):  # only top-k experts are active per token
            e, k = cfg.num_local_experts, cfg.num_experts_per_tok
            expert = 3 * cfg.hidden_size * cfg.intermediate_size
            n_params -= (e - k) * expert
        add(name, median_ms(fn, params, h), count, 6.0 * n_params * tokens)
        del fn, params
    # LM head + chunked CE at each head precision.
    h2 = h.reshape(tokens, cfg.hidden_size)
    w = jax.random.normal(jax.random.key(2), (cfg.hidden_size, cfg.vocab_size), jnp.float32) * 0.02
    targets = jax.random.randint(jax.random.key(4), (tokens,), 0, cfg.vocab_size)
    # The preset's head (fp32 at HIGHEST) counts once per step; the other two precisions are alternatives to it.
    for label, fp32, precision, count in (("LM head+CE fp32", True, "float32", 1),
                                          ("LM head+CE bf16_3x", True, "bf16_3x", None),
                                          ("LM head+CE bf16", False, "float32", None)):
        fn = jax.jit(jax.grad(lambda h, w: jnp.sum(linear_cross_entropy(
            h, w, targets, chunk_size=FLAGS.ce_chunk, fp32=fp32, fp32_precision=precision)), argnums=(0, 1)))
        add(label, median_ms(fn, h2, w), count, 6.0 * cfg.hidden_size * cfg.vocab_size * tokens)
    # The AdamW update (+ global-norm clip) over every parameter, as in the step.
    _, state = tl.create_train_state(cfg, tc)
    opt = tl.make_optimizer(tc)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), state.params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    add("AdamW update", median_ms(update, state.params, state.opt_state, grads), 1)
    del state, grads
    total = sum(r["ms_per_step"] for r in rows if r["ms_per_step"] is not None)
    print(f"{'component':22} {'ms':>8} {'x':>3} {'ms/step':>8} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['component']:22} {r['ms']:8.2f} {r['count'] or '':>3} "
              f"{r['ms_per_step'] if r['ms_per_step'] is not None else float('nan'):8.1f} "
              f"{r['tflops'] if r['tflops'] else float('nan'):8.1f}")
    print(f"sum of layers + fp32 head + AdamW: {total:.1f} ms per step (batch {b} x {t})")
    return [dict(r, batch=b, seq_len=t) for r in rows] + [{"component": "sum", "ms_per_step": total,
                                                            "batch": b, "seq_len": t}]


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
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    dt = (time.perf_counter() - t0) / FLAGS.steps
    flops = tl.train_flops_per_token(cfg, t)
    peak = tl.peak_tflops()
    tok_s = b * t / dt
    result = {"variant": name, "overrides": overrides, "batch": b, "accum": tc.grad_accum, "docs": docs,
              "step_ms": dt * 1e3, "tokens_per_s": tok_s,
              "model_tflops_per_s": flops * tok_s / 1e12, "mfu": flops * tok_s / (peak * 1e12) if peak else None,
              "gflop_per_token": flops / 1e9, "loss": float(metrics["loss"]), "compile_s": t_compile,
              "temp_gib": mem.temp_size_in_bytes / 2 ** 30 if mem else None,
              "params_total": cfg.param_counts()["total"], "active_with_head": cfg.param_counts()["active_with_head"]}
    print(json.dumps(result), flush=True)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; preset {FLAGS.preset}; "
          f"batch {FLAGS.batch} x {FLAGS.seq_len}; ce {FLAGS.ce}", flush=True)
    results = []
    if FLAGS.check_packed:
        try:
            results.append(check_packed())
        except Exception as e:  # report and go on to the timings
            print(json.dumps({"check": "packed_vs_rows", "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
    if FLAGS.breakdown:
        try:
            results += breakdown(FLAGS.batch)
        except Exception as e:  # report and go on to the timings
            print(json.dumps({"breakdown": "error", "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
    for spec in FLAGS.variant:
        name, overrides, bench = split_variant(spec)
        try:
            results.append(bench_variant(name, overrides, bench))
        except Exception as e:  # keep going: one variant running out of memory should not lose the others
            print(json.dumps({"variant": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
            results.append({"variant": name, "error": str(e)[:400]})
    print(f"{'variant':14} {'batch':>5} {'accum':>5} {'docs':>4} {'step ms':>8} {'tok/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'temp GiB':>8}")
    for r in results:
        if "step_ms" in r:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            print(f"{r['variant']:14} {r['batch']:5d} {r['accum']:5d} {r['docs']:4d} {r['step_ms']:8.1f} "
                  f"{r['tokens_per_s']:9.0f} {r['model_tflops_per_s']:8.1f} {mfu:>6} {r['temp_gib'] or 0:8.1f}")
        elif "variant" in r:
            print(f"{r['variant']:14} error: {r['error'][:100]}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, fh,
                      indent=1)


if __name__ == "__main__":
    app.run(main)
