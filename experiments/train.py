"""Train an M1-architecture model (``m1jax.train.Trainer``): sharded jitted steps, per-process data loading, orbax
checkpoints with resume, preemption, JSONL/TensorBoard metrics.

    python -m experiments.train --config=tiny --workdir=/tmp/run --steps=200 --data=synthetic:add
    python -m experiments.train --config=m1-100m --set model.compute_dtype=bfloat16 --mesh=data=4,expert=2 \\
        --data=/data/corpus --seq_len=4096 --batch=32 --grad_accum=4 --lr=3e-4 --warmup=500 --workdir=/ckpt/run
    python -m experiments.train --workdir=/ckpt/run --resume          # continue it with its stored configuration

``--config`` is a preset name (tiny, m1-100m, m1-1b, m1) or a model config file (m1jax config.json, HF config.json,
or a partial file naming its ``base`` preset). ``--set section.key=value`` (repeatable; sections ``model``, ``train``,
``run``; the section may be left out when the key is unambiguous) sets any field; the convenience flags below set
the fields their help names, and giving one together with a ``--set`` of the same field is an error. ``--resume``
continues from the latest checkpoint in ``--workdir/checkpoints`` with the stored configuration, refusing changes to
settings fixed for the run unless ``--allow_config_change``. SIGTERM or SIGINT on any process saves the current
step on all of them and exits 0. Several processes: ``--coordinator_address``, ``--num_processes``,
``--process_id`` (or JAX's own cluster detection).

Exit status: 0 done or stopped on request; 2 a problem with the input (flags, configs, work directory, data, mesh,
no intact checkpoint to resume), printed as one ``error:`` line; 3 a step's loss or gradient norm was not finite
(the run stopped without saving it); 130 a second Ctrl-C (or one before training started) aborted the run; the
checkpoints already complete are intact.
Any other failure is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints/, metrics.jsonl, tensorboard/.")
flags.DEFINE_string("config", None, "Model: preset name or config file (default tiny; on --resume the stored one).")
flags.DEFINE_multi_string("set", [], "section.key=value override of any model/train/run field (repeatable).")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir if there is one.")
flags.DEFINE_bool("allow_config_change", False, "On --resume, accept changes to settings fixed for the run.")
flags.DEFINE_string("compilation_cache", None, "Persistent XLA compilation cache directory.")
flags.DEFINE_integer("pause_at_step", None, "Preemption drill (tests): after this step and its checkpoint, wait for "
                     "a signal instead of continuing.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")

# Convenience flags: name -> the fields it sets (each flag's value is applied as field=value).
FIELD_FLAGS = {
    "steps": ("run.steps", "train.total_steps"),
    "batch": ("run.batch",),
    "seq_len": ("run.seq_len",),
    "data": ("run.data",),
    "mesh": ("run.mesh",),
    "fsdp": ("run.fsdp",),
    "seed": ("run.seed",),
    "save_every": ("run.save_every",),
    "keep": ("run.keep",),
    "log_every": ("run.log_every",),
    "eval_every": ("run.eval_every",),
    "eval_data": ("run.eval_data",),
    "init_params": ("run.init_params",),
    "peak_tflops": ("run.peak_tflops",),
    "lr": ("train.learning_rate",),
    "warmup": ("train.warmup_steps",),
    "schedule": ("train.schedule",),
    "final_lr_ratio": ("train.final_lr_ratio",),
    "weight_decay": ("train.weight_decay",),
    "clip_norm": ("train.clip_norm",),
    "grad_accum": ("train.grad_accum",),
    "ce_chunk": ("train.ce_chunk_size",),
}
BOOL_FLAGS = ("fsdp",)
for _name, _fields in FIELD_FLAGS.items():
    (flags.DEFINE_bool if _name in BOOL_FLAGS else flags.DEFINE_string)(_name, None, f"Sets {' and '.join(_fields)}.")


def field_overrides(set_items: list[str]) -> list[str]:
    """The convenience flags given on the command line as ``section.key=value`` items, then ``--set``'s; a field
    named by both is a ConfigError."""
    from m1jax.config import ConfigError

    given = {field: FLAGS[name].value for name, fields in FIELD_FLAGS.items() if FLAGS[name].present
             for field in fields}
    for item in set_items:
        key = item.split("=", 1)[0].strip()
        clash = [f for f in given if key in (f, f.split(".", 1)[1])]
        if clash:
            flag = next(n for n, fields in FIELD_FLAGS.items() if clash[0] in fields)
            raise ConfigError(f"--{flag} and --set {item} both set {clash[0]}; give it once")
    return [f"{field}={value}" for field, value in given.items()] + list(set_items)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
    from m1jax.checkpoint import CheckpointError, NonFiniteError
    from m1jax.config import ConfigError
    from m1jax.data import DataError
    from m1jax.train import Trainer, resolve_configs
    from m1jax.train.run_dir import check_workdir

    try:
        sections = resolve_configs(FLAGS.workdir, resume=FLAGS.resume, model_spec=FLAGS.config,
                                   overrides=field_overrides(FLAGS.set))
        check_workdir(FLAGS.workdir)
        import jax

        if FLAGS.compilation_cache:
            jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        from sharding.multihost import initialize

        try:
            initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        trainer = Trainer(sections["model"], sections["train"], sections["run"], FLAGS.workdir,
                          log=lambda line: print(line, flush=True))
        trainer.fit(resume=FLAGS.resume, allow_config_change=FLAGS.allow_config_change,
                    pause_at_step=FLAGS.pause_at_step)
    except (ConfigError, DataError, CheckpointError) as e:  # the user's input: one line, no traceback
        _fail(e, 2)
    except NonFiniteError as e:
        _fail(e, 3)
    except KeyboardInterrupt:
        # os._exit: Python's own exit would wait for orbax's writer threads, that is for the save the user aborts.
        # An abandoned save stays a temporary directory, which is never taken for a step.
        _fail("interrupted (Ctrl-C): a save in progress, if any, was abandoned; --resume continues from the last "
              "complete checkpoint", 130, now=True)


def _fail(message, status: int, now: bool = False) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    app.run(main)
