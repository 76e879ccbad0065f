"""One decoder layer's forward + backward under ``jax.profiler``: the kernels it runs, by kind, and the launch gaps.

    python -m benchmarks.layer_profile                        # m1-1b's lightning and softmax layers at 8K tokens
    python -m benchmarks.layer_profile --set=hidden_size=4096 --set=num_attention_heads=32 --set=head_dim=128 \
        --set=num_local_experts=8 --set=intermediate_size=4096 --kinds=lightning

Per layer kind: the median wall time of the jitted gradient (of the layer's output against a fixed random cotangent,
with respect to its parameters and its input), the device busy time in the trace and the difference (launch gaps),
the time per kind of kernel (``benchmarks.profiling``) and the heaviest kernels. This is the view that found the MoE
dispatch's scatters (0.27 ms of m1-1b's 3.6 ms lightning layer on an H200; ``benchmarks/RESULTS.md``, "Training").
"""
from __future__ import annotations

import json
import time

import numpy as np
from absl import app, flags

from benchmarks.profiling import device_trace

flags.DEFINE_string("preset", "m1-1b", "Model preset.")
flags.DEFINE_multi_string("set", [], "ModelConfig overrides key=value (compute_dtype is bfloat16).")
flags.DEFINE_integer("seq_len", 8192, "Tokens (one row).")
flags.DEFINE_list("kinds", ["lightning", "softmax"], "Layer kinds to profile.")
flags.DEFINE_integer("reps", 5, "Timed calls (median) before the trace.")
flags.DEFINE_integer("trace_steps", 3, "Calls under the profiler.")
flags.DEFINE_integer("top", 20, "Kernels listed per layer.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def profile_layer(cfg, kind: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from m1jax.layers.decoder import DecoderLayer
    t = FLAGS.seq_len
    layer_index = cfg.layer_types.index(kind)  # its decay rates (lightning) are those of the first such layer
    h = jax.random.normal(jax.random.key(1), (1, t, cfg.hidden_size), jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(2), h.shape, jnp.float32)
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    graphdef, params = nnx.split(DecoderLayer(cfg, kind, rngs=nnx.Rngs(params=0)), nnx.Param)

    def loss(params, h):
        out = nnx.merge(graphdef, params)(h, layer_index=layer_index, positions=positions)[0]
        return jnp.sum(out.astype(jnp.float32) * dy)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grad(params, h))
    times = []
    for _ in range(FLAGS.reps):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params, h))
        times.append(time.perf_counter() - t0)
    trace = device_trace(lambda: jax.block_until_ready(grad(params, h)), FLAGS.trace_steps, FLAGS.top)
    wall = 1e3 * float(np.median(times))
    return {"kind": kind, "wall_ms": wall, "gaps_ms": wall - trace.get("device_busy_ms", 0.0), "trace": trace}


def main(_):
    import jax

    from m1jax.config import ModelConfig, apply_overrides
    cfg = apply_overrides(ModelConfig.preset(FLAGS.preset), ["compute_dtype=bfloat16", *FLAGS.set])
    results = {"device": jax.devices()[0].device_kind, "preset": FLAGS.preset, "overrides": FLAGS.set,
               "seq_len": FLAGS.seq_len, "layers": []}
    for kind in FLAGS.kinds:
        r = profile_layer(cfg, kind)
        results["layers"].append(r)
        tr = r["trace"]
        print(f"{kind} layer, forward + backward at {FLAGS.seq_len} tokens: wall {r['wall_ms']:.3f} ms, device busy "
              f"{tr.get('device_busy_ms', 0):.3f} ms in {tr.get('kernels_per_step', 0):.0f} kernels", flush=True)
        for cat, v in tr.get("categories", {}).items():
            print(f"    {cat:24s} {v['ms']:7.3f} ms {v['calls']:5.0f} kernels")
        for k in tr.get("top", []):
            print(f"    {k['ms']:7.3f} ms x{k['calls']:3.0f}  {k['kernel']}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    app.run(main)
