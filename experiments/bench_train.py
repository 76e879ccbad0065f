"""Throughput and MFU of the train step (forward + backward + AdamW update) on one device.

    python -m experiments.bench_train --preset=m1-1b --seq_len=8192 --batch=4 \\
        --variant="m1=" --variant="bf16_head=lm_head_fp32=false" --out=/tmp/bench_train.json

Each ``--variant`` is ``name=override;override`` (ModelConfig ``key=value`` pairs on top of the preset and
``compute_dtype=bfloat16``); all run in one process, one after another, on the same random token batch (one document
per row, so no segment ids: the softmax layers may take cuDNN's fused attention). MFU = model FLOPs per token
(``m1jax.train.train_flops_per_token``: 6 x active matmul params incl. the LM head, + lightning and causal softmax
attention) x tokens/s / the device's dense bf16 datasheet peak.
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


def bench_variant(name: str, overrides: list[str]) -> dict:
    import jax
    import numpy as np

    from m1jax import train as tl
    from m1jax.config import ModelConfig, apply_overrides

    cfg = apply_overrides(ModelConfig.preset(FLAGS.preset), ["compute_dtype=bfloat16", *overrides])
    tc = tl.TrainConfig(learning_rate=1e-4, warmup_steps=0, total_steps=100, ce_chunk_size=FLAGS.ce_chunk,
                        ce_implementation=FLAGS.ce)
    b, t = FLAGS.batch, FLAGS.seq_len
    t0 = time.perf_counter()
    graphdef, state = tl.create_train_state(cfg, tc)
    step = tl.make_train_step(graphdef, tc)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t + 1))
    batch = jax.device_put({"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
                            "loss_mask": np.ones((b, t), bool),
                            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))})
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
    result = {"variant": name, "overrides": overrides, "step_ms": dt * 1e3, "tokens_per_s": tok_s,
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
    for spec in FLAGS.variant:
        name, _, rest = spec.partition("=")
        overrides = [o for o in rest.split(";") if o]
        try:
            results.append(bench_variant(name, overrides))
        except Exception as e:  # keep going: one variant running out of memory should not lose the others
            print(json.dumps({"variant": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}), flush=True)
            results.append({"variant": name, "error": str(e)[:400]})
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "results": results}, fh,
                      indent=1)


if __name__ == "__main__":
    app.run(main)
