"""Long-context generation speed: an M1-pattern hybrid model against the same model with every layer softmax.

    python -m benchmarks.generate --out=/tmp/gen.json                   # the full plan (GPU)
    python -m benchmarks.generate --preset=tiny --prefill=64,128 --long_prefill= --decode_contexts=64 \
        --decode_batches=1,2 --chunk=32 --decode_steps=4                        # CPU smoke

Measures (bf16 params and compute, bf16 KV cache, fp32 lightning states):
* prefill latency at each length (batch 1, chunked prefill through ``m1jax.generate.prefill``, the cache sized to
  the prompt), best of 2-3 calls after a first (compiling) one;
* decode step time (the jitted ``lax.while_loop``, ``decode_steps`` tokens, greedy) at each context length and batch:
  the cache is sized to context + steps and its index set to the context, filled with a non-zero constant (dense
  attention and state updates cost the same for any values).
Each measurement is recorded (or its error) and the run goes on; a table is printed last, JSON goes to --out.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
import traceback

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "m1-1b", "Model preset (M1 layer pattern).")
flags.DEFINE_list("prefill", ["8192", "32768", "131072"], "Prefill lengths for both models.")
flags.DEFINE_list("long_prefill", ["524288", "1048576"], "Extra prefill lengths for the hybrid model only.")
flags.DEFINE_list("decode_contexts", ["4096", "32768", "131072"], "Decode context lengths.")
flags.DEFINE_list("decode_batches", ["1", "64"], "Decode batch sizes.")
flags.DEFINE_integer("chunk", 16384, "Prefill chunk size.")
flags.DEFINE_integer("decode_steps", 32, "Tokens per timed decode loop.")
flags.DEFINE_float("max_kv_gib", 40.0, "Skip decode points whose KV cache would exceed this.")
flags.DEFINE_list("models", ["hybrid", "softmax"], "Which models to run.")
flags.DEFINE_bool("check", True, "First check the cuDNN chunk attention against the einsum attention (GPU).")
flags.DEFINE_string("out", None, "JSON output path.")
flags.DEFINE_list("merge", [], "Only merge these result JSONs (with --out's, if it exists): print the table, and "
                  "draw --plot.")
flags.DEFINE_string("plot", None, "PNG path for the plot (matplotlib).")


def _configs():
    from m1jax.config import SOFTMAX, ModelConfig
    hybrid = ModelConfig.preset(FLAGS.preset, compute_dtype="bfloat16", param_dtype="bfloat16")
    softmax = hybrid.replace(layer_types=(SOFTMAX,) * hybrid.num_hidden_layers)
    return {"hybrid": hybrid, "softmax": softmax}


def _check_chunk_attention():
    """cuDNN chunk attention (left padding, three chunks) vs the masked einsum in fp32: relative error."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.attention import Mask, attention, cudnn
    if "cuda" not in cudnn.native_platforms() or jax.default_backend() != "gpu":
        return {"skipped": "no cuDNN attention on this backend"}
    rng = np.random.default_rng(0)
    b, s, h, hkv, d, t = 2, 3 * 256, 16, 2, 64, 256
    start = jnp.asarray([0, 300])
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.bfloat16) for n in (h, hkv, hkv))
    slots = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
    errors = []
    for index in range(0, s, t):
        filled = (slots < index + t)[..., None, None]
        k_cache, v_cache = jnp.where(filled, k, 0), jnp.where(filled, v, 0)
        mask = Mask.cache(jnp.int32(index), t, s, start)
        got = jax.jit(lambda *a: attention(*a, implementation="cudnn"))(q[:, index:index + t], k_cache, v_cache, mask)
        want = attention(*(x.astype(jnp.float32) for x in (q[:, index:index + t], k_cache, v_cache)), mask,
                         implementation="xla")
        valid = np.asarray(slots[:, index:index + t] >= start[:, None])
        g, w = np.asarray(got, np.float32)[valid], np.asarray(want)[valid]
        errors.append(float(np.linalg.norm(g - w) / np.linalg.norm(w)))
    return {"rel_error_per_chunk": errors, "ok": max(errors) < 2e-2}


def _fill(cache, context, value=0.01):
    import jax
    import jax.numpy as jnp
    layers = jax.tree_util.tree_map(lambda a: jnp.full_like(a, value), cache.layers)
    return dataclasses.replace(cache, layers=layers, index=jnp.int32(context))


def _bench_prefill(name, cfg, split, lengths, record):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m1jax import generate as gen
    from m1jax.cache import HybridCache
    rng = np.random.default_rng(0)
    for n in sorted(lengths):
        point = {"kind": "prefill", "model": name, "length": n, "chunk": min(FLAGS.chunk, n)}
        try:
            tokens = rng.integers(0, cfg.vocab_size, (1, n)).astype(np.int32)
            times = []
            for rep in range(3 if n <= 32768 else 2):  # the first call of the first length compiles
                cache = HybridCache.init(cfg, 1, n + 16, kv_dtype="bfloat16")
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                logits, cache = gen.prefill(*split, tokens, cache, min(FLAGS.chunk, n))
                float(jnp.sum(logits))
                times.append(time.perf_counter() - t0)
                cache_bytes = (cache.lightning_bytes(), cache.kv_bytes())
                del cache
            point.update(seconds=min(times[1:]), first_call_s=times[0], tokens_per_s=n / min(times[1:]),
                         lightning_state_bytes=cache_bytes[0], kv_cache_bytes=cache_bytes[1],
                         finite=bool(np.isfinite(np.asarray(logits)).all()))
        except Exception as e:  # record and go on (out of memory at the longest lengths, say)
            point["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        print(json.dumps(point), flush=True)
        record.append(point)


def _bench_decode(name, cfg, split, record):
    import jax
    import jax.numpy as jnp

    from m1jax import generate as gen
    from m1jax.cache import HybridCache
    steps = FLAGS.decode_steps
    kv_per_token = sum(2 * cfg.num_key_value_heads * cfg.head_dim * 2 for t in cfg.layer_types if t == "softmax")
    for batch in map(int, FLAGS.decode_batches):
        for context in map(int, FLAGS.decode_contexts):
            point = {"kind": "decode", "model": name, "batch": batch, "context": context, "steps": steps}
            kv_gib = kv_per_token * batch * (context + 2 * steps) / 2 ** 30
            if kv_gib > FLAGS.max_kv_gib:
                point["skipped"] = f"KV cache {kv_gib:.1f} GiB > {FLAGS.max_kv_gib}"
                print(json.dumps(point), flush=True)
                record.append(point)
                continue
            try:
                cache = _fill(HybridCache.init(cfg, batch, context + 2 * steps, kv_dtype="bfloat16"), context)
                logits = jax.random.normal(jax.random.key(0), (batch, cfg.vocab_size), jnp.float32)
                stop = gen.StopRules.make(truncate_after=0)
                times = []
                for _ in range(2):  # first call compiles
                    t0 = time.perf_counter()
                    out = gen.decode(*split, logits, cache, jax.random.key(1), max_new_tokens=steps,
                                     sampling=gen.Sampling.greedy(), stop=stop)
                    int(jnp.sum(out.lengths))
                    times.append(time.perf_counter() - t0)
                    cache = dataclasses.replace(out.cache, index=jnp.int32(context))
                point.update(step_ms=1e3 * times[1] / steps, first_call_s=times[0], kv_gib=kv_gib,
                             tokens_per_s=batch * steps / times[1])
                del cache, out
            except Exception as e:
                point["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            print(json.dumps(point), flush=True)
            record.append(point)


def _summary(results):
    rows = [r for r in results["points"] if "error" not in r and "skipped" not in r]
    by = {(r["kind"], r["model"], r.get("length"), r.get("batch"), r.get("context")): r for r in rows}
    lines = ["prefill (batch 1): length  hybrid_s  softmax_s  speedup"]
    for n in sorted({r["length"] for r in rows if r["kind"] == "prefill"}):
        h, s = by.get(("prefill", "hybrid", n, None, None)), by.get(("prefill", "softmax", n, None, None))
        ratio = f"{s['seconds'] / h['seconds']:.2f}x" if h and s else "-"
        lines.append(f"  {n:>8}  {h['seconds'] if h else float('nan'):8.3f}  "
                     f"{s['seconds'] if s else float('nan'):9.3f}  {ratio}")
    lines.append("decode step ms: batch context  hybrid  softmax")
    for b, c in sorted({(r["batch"], r["context"]) for r in rows if r["kind"] == "decode"}):
        h, s = by.get(("decode", "hybrid", None, b, c)), by.get(("decode", "softmax", None, b, c))
        lines.append(f"  {b:>4} {c:>8}  {h['step_ms'] if h else float('nan'):7.3f}  "
                     f"{s['step_ms'] if s else float('nan'):7.3f}")
    for r in results["points"]:
        if "error" in r or "skipped" in r:
            lines.append(f"  not measured: {r['kind']} {r['model']} "
                         f"{r.get('length') or (r.get('batch'), r.get('context'))}: "
                         f"{r.get('error') or r.get('skipped')}")
    return "\n".join(lines)


def _plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results["points"] if "error" not in r and "skipped" not in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model, marker in (("hybrid", "o"), ("softmax", "s")):
        pts = sorted((r["length"], r["seconds"]) for r in ok if r["kind"] == "prefill" and r["model"] == model)
        if pts:
            left.loglog(*zip(*pts), marker=marker, label=f"{model}", base=2)
        for batch, style in ((1, "-"), (64, "--")):
            pts = sorted((r["context"], r["step_ms"]) for r in ok
                         if r["kind"] == "decode" and r["model"] == model and r["batch"] == batch)
            if pts:
                right.plot(*zip(*pts), style, marker=marker, label=f"{model}, batch {batch}")
    left.set(xlabel="prompt tokens", ylabel="prefill latency (s), batch 1", title="Chunked prefill")
    right.set(xscale="log", xlabel="context tokens", ylabel="decode step (ms)", title="Decode step vs context")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results.get('flags', {}).get('preset', '')} bf16 on {results.get('device_kind', '?')}, "
                 f"jax {results.get('jax', '?')} ({results.get('date', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    del argv
    if FLAGS.merge:
        merged = None
        for path in FLAGS.merge:
            with open(path) as fh:
                part = json.load(fh)
            merged = part if merged is None else {**merged, **{k: v for k, v in part.items() if k != "points"},
                                                 "points": merged["points"] + part["points"]}
        if FLAGS.out:
            with open(FLAGS.out, "w") as fh:
                json.dump(merged, fh, indent=1)
        print(_summary(merged))
        if FLAGS.plot:
            _plot(merged, FLAGS.plot)
        return
    import jax
    from flax import nnx

    from m1jax.model import init_model
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__,
               "devices": [str(d) for d in jax.devices()], "device_kind": jax.devices()[0].device_kind,
               "python": platform.python_version(), "flags": {k: FLAGS[k].value for k in (
                   "preset", "prefill", "long_prefill", "decode_contexts", "decode_batches", "chunk",
                   "decode_steps", "models")}, "points": []}
    if FLAGS.check:
        try:
            results["chunk_attention_check"] = _check_chunk_attention()
        except Exception as e:
            results["chunk_attention_check"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            traceback.print_exc()
        print("check:", json.dumps(results["chunk_attention_check"]), flush=True)
    for name, cfg in _configs().items():
        if name not in FLAGS.models:
            continue
        t0 = time.perf_counter()
        split = nnx.split(init_model(cfg, seed=0))
        counts = cfg.param_counts()
        results[f"{name}_params"] = counts
        print(f"{name}: {counts['total'] / 1e9:.2f}B params ({counts['active'] / 1e9:.2f}B active), layers "
              f"{''.join('S' if t == 'softmax' else 'L' for t in cfg.layer_types)}, "
              f"init {time.perf_counter() - t0:.1f}s", flush=True)
        lengths = [int(x) for x in FLAGS.prefill] + ([int(x) for x in FLAGS.long_prefill] if name == "hybrid"
                                                      else [])
        _bench_prefill(name, cfg, split, lengths, results["points"])
        _bench_decode(name, cfg, split, results["points"])
        del split
        if FLAGS.out:  # partial results survive a later failure
            with open(FLAGS.out, "w") as fh:
                json.dump(results, fh, indent=1)
    print(_summary(results))


if __name__ == "__main__":
    app.run(main)
