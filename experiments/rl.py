"""CISPO RL on noisy-carry addition: teacher pretraining of a small M1-pattern model, then RL with --loss.

    python -m experiments.rl                                   # the embedded tiny CPU demo (about a minute)
    python -m experiments.rl --loss=dapo --mu=8 --rl_steps=100 --set rl.eval_problems=64
    python -m experiments.rl --init_checkpoint=/tmp/m1jax_rl/pretrained --loss=cispo --ratio_max=2
    python -m experiments.rl --workdir=/tmp/run --resume      # continue a run from its latest checkpoint
    # several hosts: the same command on each, with --coordinator_address=host0:1234 --num_processes=N
    # --process_id=i (or the JAX_* variables / a SLURM or TPU cluster) and a --mesh over all their devices

Tasks: --task=arithmetic (a+b=, the first reproduction's) or column_addition (aligned operands, K spread over
--min_digits..--max_digits, decision points at the carries: the second reproduction's).

Stages (docs/rl.md): (1) SFT on the imperfect teacher's answers (it forgets each carry with probability
--forget_prob, so the pretrained policy puts about 1 - p on the correct digit at carry positions: the rare "fork"
tokens); (2) RL with the library's learner (m1jax.rl.learner): rollouts of --group_size samples per prompt, verifier
rewards, group advantages, --mu minibatch updates per rollout batch. Writes to --workdir: config.json, the pretrained
policy (pretrained/), RL checkpoints (checkpoints/), metrics.jsonl and TensorBoard events, accuracy.png.

The flags set the common fields; ``--set section.key=value`` (repeatable) reaches every field of the sections model,
sft, rollout, update and rl, e.g. ``--set update.old_logp=trainer --set rollout.temperature=0.8``.

Accuracy is on a fixed held-out set: ``acc`` is the mean reward of --eval_samples samples per problem at temperature
1 (the analogue of avg@k), ``greedy_acc`` the greedy answer's; ``acc_carry`` and ``greedy_acc_carry`` the same over the
problems with a carry (the ones with fork tokens).
"""
from __future__ import annotations

import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
# Model (an M1-pattern hybrid: every --period-th layer softmax, the rest lightning; MoE feed-forward).
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("period", 4, "Layer period: period - 1 lightning layers then one softmax layer (M1: 8).")
flags.DEFINE_integer("hidden", 64, "Hidden size.")
flags.DEFINE_integer("heads", 4, "Attention heads (lightning and softmax).")
flags.DEFINE_integer("head_dim", 16, "Head dimension.")
flags.DEFINE_integer("experts", 4, "MoE experts.")
flags.DEFINE_integer("ffn", 64, "Expert intermediate size.")
flags.DEFINE_string("compute_dtype", "float32", "Body compute dtype (bfloat16 on GPU).")
flags.DEFINE_bool("fp32_head", True, "LM head with fp32 operands in sampler and trainer (M1); false: compute dtype.")
# Task.
flags.DEFINE_enum("task", "arithmetic", ["arithmetic", "column_addition"], "arithmetic: a+b= written as usual "
                  "(m1jax.rl.tasks.arithmetic); column_addition: aligned operands and decision points "
                  "(m1jax.rl.tasks.column_addition).")
flags.DEFINE_integer("operands", 2, "column_addition: numbers to add (2 to 9).")
flags.DEFINE_integer("min_digits", 1, "Fewest digits per operand.")
flags.DEFINE_integer("max_digits", 1, "Most digits per operand.")
flags.DEFINE_float("forget_prob", 0.6, "Teacher's probability of forgetting a carry.")
# Teacher pretraining.
flags.DEFINE_string("init_checkpoint", None, "Directory of a pretrained policy (skips pretraining).")
flags.DEFINE_integer("sft_steps", 250, "Pretraining steps.")
flags.DEFINE_integer("sft_batch", 64, "Pretraining batch size.")
flags.DEFINE_float("sft_lr", 1e-2, "Pretraining peak learning rate (cosine, 5% warm-up).")
# RL.
flags.DEFINE_enum("loss", "cispo", ["cispo", "cispo_masked", "ppo", "grpo", "dapo", "drgrpo"], "Policy loss.")
flags.DEFINE_float("ratio_max", None, "CISPO absolute IS-weight cap (default: the loss's, 5.0).")
flags.DEFINE_float("eps_is_high", None, "CISPO cap as 1 + eps_is_high (M1 style) instead of --ratio_max.")
flags.DEFINE_float("eps_low", None, "PPO-family / cispo_masked trust region low (default: the loss's).")
flags.DEFINE_float("eps_high", None, "PPO-family / cispo_masked trust region high (default: the loss's).")
flags.DEFINE_string("agg", None, "Loss aggregation (default: the loss's).")
flags.DEFINE_string("adv_norm", None, "Advantage norm: group_std, mean_only, batch_std, none (default: mean_only "
                    "for drgrpo, else group_std).")
flags.DEFINE_bool("dynamic_sampling", None, "DAPO dynamic sampling (default: on for dapo/cispo/cispo_masked).")
flags.DEFINE_integer("oversample", 2, "Prompts sampled per kept group under dynamic sampling.")
flags.DEFINE_integer("mu", 4, "Minibatch updates per rollout batch.")
flags.DEFINE_integer("prompts", 16, "Groups (prompts) per RL step.")
flags.DEFINE_integer("group_size", 8, "Samples per prompt (G).")
flags.DEFINE_integer("rl_steps", 40, "RL steps (rollout batches).")
flags.DEFINE_float("lr", 3e-4, "RL learning rate (constant after warm-up).")
flags.DEFINE_integer("warmup", 0, "RL warm-up, in optimizer updates.")
flags.DEFINE_float("adam_eps", 1e-8, "AdamW eps (M1: 1e-15).")
flags.DEFINE_float("clip_norm", 1.0, "Global-norm gradient clipping.")
flags.DEFINE_enum("old_logp", "sampler", ["sampler", "trainer"], "Source of log pi_old.")
flags.DEFINE_integer("truncate_after", 3000, "M1 repetition truncation: run length of confident tokens (<=0 off).")
flags.DEFINE_float("truncate_prob", 0.99, "M1 repetition truncation: probability threshold.")
# Evaluation, output, processes.
flags.DEFINE_integer("eval_every", 5, "Evaluate every this many RL steps.")
flags.DEFINE_integer("eval_problems", 32, "Held-out problems.")
flags.DEFINE_integer("eval_samples", 8, "Samples per held-out problem (temperature 1).")
flags.DEFINE_integer("seed", 0, "Seed (model init, data, sampling).")
flags.DEFINE_string("workdir", "/tmp/m1jax_rl", "Output directory.")
flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir (else start afresh there).")
flags.DEFINE_bool("overwrite", False, "Start afresh in a --workdir that holds an earlier run's RL checkpoints, "
                  "deleting them (without it such a directory is refused).")
flags.DEFINE_integer("checkpoint_every", 0, "Save the RL state every this many steps (0: at the end only).")
flags.DEFINE_multi_string("set", [], "Config override section.key=value (sections model, sft, rollout, update, rl).")
flags.DEFINE_string("mesh", None, "Mesh over all devices, e.g. data=4,expert=2 (default: one device; with several "
                    "processes all devices on data).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")


def make_task():
    """The task of the flags; bad settings raise app.UsageError."""
    from m1jax.rl.tasks import ArithmeticTask, ColumnAdditionTask
    digits = dict(min_digits=FLAGS.min_digits, max_digits=FLAGS.max_digits, forget_prob=FLAGS.forget_prob)
    try:
        if FLAGS.task == "column_addition":
            return ColumnAdditionTask(operands=FLAGS.operands, **digits)
        return ArithmeticTask(**digits)
    except ValueError as err:
        raise app.UsageError(f"--task={FLAGS.task}: {err}") from None


def configs_from_flags(task) -> dict:
    """The run's config sections from the flags, then ``--set`` overrides: {"model", "sft", "rollout", "update",
    "rl"}."""
    from m1jax.config import ModelConfig, apply_section_overrides, m1_layer_types
    from m1jax.rl.learner import RLConfig
    from m1jax.rl.pretrain import SFTConfig
    from m1jax.rl.rollout import RolloutConfig
    from m1jax.rl.step import UpdateConfig
    model = ModelConfig.tiny(vocab_size=task.vocab_size, hidden_size=FLAGS.hidden, num_hidden_layers=FLAGS.layers,
                             layer_types=m1_layer_types(FLAGS.layers, FLAGS.period), num_attention_heads=FLAGS.heads,
                             num_key_value_heads=FLAGS.heads, head_dim=FLAGS.head_dim, rotary_dim=FLAGS.head_dim // 2,
                             intermediate_size=FLAGS.ffn, num_local_experts=FLAGS.experts,
                             max_position_embeddings=task.max_prompt_tokens + task.max_new_tokens, block_size=16,
                             compute_dtype=FLAGS.compute_dtype, lm_head_fp32=FLAGS.fp32_head)
    knobs = {k: getattr(FLAGS, k) for k in ("ratio_max", "eps_is_high", "eps_low", "eps_high", "agg")}
    sections = {
        "model": model,
        "sft": SFTConfig(steps=FLAGS.sft_steps, batch=FLAGS.sft_batch, learning_rate=FLAGS.sft_lr, seed=FLAGS.seed),
        "rollout": RolloutConfig(group_size=FLAGS.group_size, truncate_after=FLAGS.truncate_after,
                                 truncate_prob=FLAGS.truncate_prob),
        "update": UpdateConfig(loss=FLAGS.loss, **knobs, mu=FLAGS.mu, learning_rate=FLAGS.lr,
                               warmup_steps=FLAGS.warmup, eps=FLAGS.adam_eps, clip_norm=FLAGS.clip_norm,
                               fp32_head=FLAGS.fp32_head, old_logp=FLAGS.old_logp),
        "rl": RLConfig(prompts=FLAGS.prompts, adv_norm=FLAGS.adv_norm, dynamic_sampling=FLAGS.dynamic_sampling,
                       oversample=FLAGS.oversample, steps=FLAGS.rl_steps, eval_every=FLAGS.eval_every,
                       eval_problems=FLAGS.eval_problems, eval_samples=FLAGS.eval_samples, seed=FLAGS.seed,
                       checkpoint_every=FLAGS.checkpoint_every),
    }
    return apply_section_overrides(sections, FLAGS.set)


def make_mesh_from_flags():
    """--mesh over all processes' devices; None (one device) for one process without --mesh."""
    import jax

    from sharding.mesh import make_mesh
    if FLAGS.mesh is None and jax.process_count() == 1:
        return None
    return make_mesh(FLAGS.mesh)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    from sharding.multihost import initialize
    initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    import dataclasses

    import jax

    from m1jax.config import ConfigError
    from m1jax.rl.experiment import run_experiment
    t0 = time.perf_counter()
    primary = jax.process_index() == 0
    log = (lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)) if primary else (  # noqa: E731
        lambda msg: None)
    task = make_task()
    try:
        sections = configs_from_flags(task)
    except ConfigError as err:
        raise app.UsageError(str(err)) from None
    from m1jax.errors import user_errors
    with user_errors():
        run_experiment(FLAGS.workdir, task, **sections, mesh=make_mesh_from_flags(),
                       init_checkpoint=FLAGS.init_checkpoint, resume=FLAGS.resume, overwrite=FLAGS.overwrite,
                       task_section={"name": FLAGS.task, **dataclasses.asdict(task)}, log=log)


if __name__ == "__main__":
    app.run(main)
