"""Train an M1-architecture model: sharded jitted steps, orbax checkpoints with resume, TensorBoard + JSONL metrics.

    python -m experiments.train --config=tiny --workdir=/tmp/run --steps=200 --data=synthetic:add
    python -m experiments.train --config=m1-100m --set compute_dtype=bfloat16 --mesh=data=4,expert=2 \\
        --data=/data/corpus --seq_len=4096 --batch=32 --grad_accum=4 --lr=3e-4 --warmup=500 --resume
    python -m experiments.train --config=my_model.yaml --init_params=/ckpt/m1-orbax/params ...

``--config`` is a preset name (tiny, m1-100m, m1-1b, m1) or a JSON/YAML file of ModelConfig fields or an HF
``config.json``; ``--set key=value`` (repeatable) overrides fields with type checks. ``--data`` is ``synthetic:add``,
``synthetic:mul`` or a token-file prefix (``m1jax.data.write_token_file`` / ``tokenize_to_file``). SIGTERM saves the
current step and exits 0; ``--resume`` continues from the latest checkpoint in ``--workdir/checkpoints``.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset name, or a JSON/YAML file (ModelConfig fields or an HF config.json).")
flags.DEFINE_multi_string("set", [], "ModelConfig override key=value (repeatable, type-checked).")
flags.DEFINE_string("mesh", None, "Mesh spec, e.g. data=4,expert=2 (default: all devices on data).")
flags.DEFINE_bool("fsdp", False, "Shard parameters and optimizer state over the data axis too.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, TensorBoard events.")
flags.DEFINE_integer("steps", 100, "Total optimizer steps (the schedule's length).")
flags.DEFINE_integer("batch", 8, "Global batch (sequences per step, all micro-batches together).")
flags.DEFINE_integer("seq_len", None, "Tokens per sequence (default for synthetic tasks: the task's longest).")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per step.")
flags.DEFINE_float("lr", 3e-4, "Peak learning rate.")
flags.DEFINE_integer("warmup", 0, "Linear warm-up steps.")
flags.DEFINE_enum("schedule", "cosine", ["cosine", "linear", "constant"], "Decay after warm-up.")
flags.DEFINE_float("final_lr_ratio", 0.1, "Final / peak learning rate for cosine and linear decay.")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay (matrices only).")
flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip (<= 0: off).")
flags.DEFINE_integer("ce_chunk", 8192, "Vocabulary chunk of the fused LM head + cross-entropy.")
flags.DEFINE_string("data", "synthetic:add", "synthetic:add, synthetic:mul, or a token-file prefix.")
flags.DEFINE_integer("seed", 0, "Seed for parameters and data order.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir if there is one.")
flags.DEFINE_string("init_params", None, "Start from converted parameters (experiments.convert output 'params' dir).")
flags.DEFINE_integer("save_every", 100, "Checkpoint every N steps (and at the end, and on SIGTERM).")
flags.DEFINE_integer("keep", 3, "Checkpoints to keep.")
flags.DEFINE_integer("log_every", 1, "Print the progress line every N steps (metrics are written every step).")
flags.DEFINE_float("peak_tflops", None, "MFU denominator (default: the device's dense bf16 datasheet peak).")
flags.DEFINE_string("compilation_cache", None, "Persistent XLA compilation cache directory.")
flags.DEFINE_integer("pause_at_step", None, "Preemption drill (tests): after this step and its checkpoint, wait for "
                     "a signal instead of continuing.")


def load_config(spec: str):
    """Preset name or a JSON/YAML file -> ModelConfig (files are parsed as data, never executed)."""
    from m1jax.config import ModelConfig

    if not os.path.exists(spec):
        return ModelConfig.preset(spec)
    with open(spec) as fh:
        if spec.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(fh)
        else:
            d = json.load(fh)
    if not isinstance(d, dict):
        raise ValueError(f"{spec}: expected a mapping of config fields")
    if "model_type" in d or "attn_type_list" in d:
        return ModelConfig.from_hf_config(d)
    return ModelConfig().replace(**d)


class MetricsWriter:
    """One JSON line per step in ``metrics.jsonl`` and TensorBoard scalars (tensorboardX) under ``tensorboard/``."""

    def __init__(self, workdir: str):
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        for k, v in values.items():
            self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def progress_line(step: int, total: int, values: dict) -> str:
    width = 30
    done = int(width * step / max(total, 1))
    parts = [f"[{'#' * done}{'.' * (width - done)}] {step}/{total}", f"loss {values['loss']:.4f}",
             f"aux {values['aux_loss']:.4f}", f"gnorm {values['grad_norm']:.3f}", f"lr {values['learning_rate']:.2e}",
             f"{values['tokens_per_s']:,.0f} tok/s"]
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    return "  ".join(parts)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    from m1jax.config import apply_overrides

    try:
        cfg = apply_overrides(load_config(FLAGS.config), FLAGS.set)
    except ValueError as e:  # unknown keys, bad types, keys set twice: a usage error, not a traceback
        raise app.UsageError(str(e))
    import jax

    if FLAGS.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from sharding.mesh import make_mesh
    from sharding.multihost import initialize

    initialize()
    train(cfg, make_mesh(FLAGS.mesh))


def train(cfg, mesh) -> None:
    import jax

    from m1jax import checkpoint as ckpt
    from m1jax import data as data_lib
    from m1jax import train as tl

    workdir = FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    tc = tl.TrainConfig(learning_rate=FLAGS.lr, schedule=FLAGS.schedule, warmup_steps=FLAGS.warmup,
                        total_steps=FLAGS.steps, final_lr_ratio=FLAGS.final_lr_ratio, weight_decay=FLAGS.weight_decay,
                        clip_norm=FLAGS.clip_norm if FLAGS.clip_norm > 0 else None, grad_accum=FLAGS.grad_accum,
                        ce_chunk_size=FLAGS.ce_chunk)
    data = data_lib.make_iterator(FLAGS.data, FLAGS.batch, FLAGS.seq_len, FLAGS.seed)
    vocab = getattr(data, "vocab_size", None) or data.source.vocab_size
    if vocab > cfg.vocab_size:
        raise app.UsageError(f"data vocabulary {vocab} exceeds the model's vocab_size {cfg.vocab_size}")
    seq_len = data.seq_len

    graphdef, abstract = tl.abstract_train_state(cfg, tc)
    shardings = tl.train_state_shardings(abstract, mesh, FLAGS.fsdp)
    checkpointer = ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=FLAGS.keep)
    start = checkpointer.latest_step() if FLAGS.resume else None
    if start is not None:
        state, data_state = checkpointer.restore(ckpt.with_shardings(abstract, shardings), start)
        data.restore(data_state)
        print(f"resumed from {checkpointer.step_path(start)}", flush=True)
    else:
        if checkpointer.latest_step() is not None:
            raise app.UsageError(f"{checkpointer.directory} already holds checkpoints; pass --resume or use a new "
                                 "--workdir")
        _, state = tl.create_train_state(cfg, tc, seed=FLAGS.seed, mesh=mesh, fsdp=FLAGS.fsdp)
        if FLAGS.init_params:
            params = ckpt.load_params(FLAGS.init_params, ckpt.with_shardings(abstract.params, shardings.params))
            state = jax.jit(lambda p: tl.init_train_state(p, tc, FLAGS.seed), out_shardings=shardings)(params)
    batch_sh = tl.batch_shardings(mesh, (FLAGS.batch, seq_len))
    step_fn = tl.make_train_step(graphdef, tc, shardings, batch_sh, fsdp=FLAGS.fsdp)
    flops = tl.train_flops_per_token(cfg, seq_len)
    peak = FLAGS.peak_tflops or tl.peak_tflops()
    n_devices = mesh.devices.size
    writer = MetricsWriter(workdir) if jax.process_index() == 0 else None
    step = int(state.step)
    print(f"model {cfg.param_counts()['total']:,} params ({cfg.param_counts()['active_with_head']:,} active with "
          f"head); mesh {dict(zip(mesh.axis_names, mesh.axis_sizes))}; batch {FLAGS.batch} x {seq_len}; "
          f"{flops / 1e9:.3f} GFLOP/token", flush=True)

    def save(at_step: int, force: bool = False):
        if checkpointer.latest_step() != at_step:
            checkpointer.save(at_step, state, data.state(), force=force)

    with ckpt.PreemptionGuard() as guard:
        while step < FLAGS.steps and not guard.requested:
            batch = jax.device_put(next(data), batch_sh)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            values = tl.host_metrics(metrics)  # blocks on the step
            dt = time.perf_counter() - t0
            step += 1
            values["step_time_s"] = dt
            values["tokens_per_s"] = FLAGS.batch * seq_len / dt
            if peak:
                values["mfu"] = flops * values["tokens_per_s"] / (peak * 1e12 * n_devices)
            if writer is not None:
                writer.write(step, values)
            if step % FLAGS.log_every == 0 or step == FLAGS.steps:
                print(progress_line(step, FLAGS.steps, values), flush=True)
            if step % FLAGS.save_every == 0 or step == FLAGS.steps:
                save(step, force=True)
            if FLAGS.pause_at_step is not None and step == FLAGS.pause_at_step:
                checkpointer.wait()
                print(f"PAUSED at step {step}", flush=True)
                while not guard.requested:
                    time.sleep(0.05)
        if guard.requested:
            print(f"signal {guard.signal}: saving step {step} and exiting", flush=True)
            save(step, force=True)
    checkpointer.close()
    if writer is not None:
        writer.close()
    print(f"done at step {step}; checkpoints {checkpointer.all_steps()} in {checkpointer.directory}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
