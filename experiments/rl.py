"""CISPO RL on noisy-carry addition: teacher pretraining of a small M1-pattern model, then RL with --loss.

    python -m experiments.rl                                   # the embedded tiny CPU demo (a few minutes)
    python -m experiments.rl --loss=dapo --mu=8 --rl_steps=100
    python -m experiments.rl --init_checkpoint=/tmp/m1jax_rl/pretrained --loss=cispo --ratio_max=2

Stages (spec/rl-cispo.md section 5): (1) SFT on the imperfect teacher's answers (it forgets each carry with probability
--forget_prob, so the pretrained policy puts about 1 - p on the correct digit at carry positions: the rare "fork"
tokens); (2) RL: rollouts of --group_size samples per prompt at temperature 1, verifier rewards, group advantages,
--mu minibatch updates per rollout batch (m1jax.rl.step). Prints progress; writes to --workdir orbax checkpoints
of the pretrained policy (pretrained/) and of the final RL params and optimizer state (rl_checkpoint/), each with
its config.json, metrics.jsonl, TensorBoard events (if tensorboardX is installed) and accuracy.png (if matplotlib is
installed).

Accuracy is on a fixed held-out set: ``acc`` is the mean reward of --eval_samples samples per problem at temperature
1 (the analogue of avg@k), ``greedy_acc`` the greedy answer's; ``acc_carry`` and ``greedy_acc_carry`` the same over the
problems with a carry (the ones with fork tokens).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from typing import TYPE_CHECKING

from absl import app, flags, logging

if TYPE_CHECKING:  # the jax-importing modules load lazily, inside the functions that need them
    from m1jax.rl.rollout import RolloutConfig
    from m1jax.rl.step import UpdateConfig

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
flags.DEFINE_integer("min_digits", 1, "Fewest digits per operand.")
flags.DEFINE_integer("max_digits", 1, "Most digits per operand.")
flags.DEFINE_float("forget_prob", 0.6, "Teacher's probability of forgetting a carry.")
# Teacher pretraining.
flags.DEFINE_string("init_checkpoint", None, "Directory of pretrained params (skips pretraining).")
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
# Evaluation and output.
flags.DEFINE_integer("eval_every", 5, "Evaluate every this many RL steps.")
flags.DEFINE_integer("eval_problems", 32, "Held-out problems.")
flags.DEFINE_integer("eval_samples", 8, "Samples per held-out problem (temperature 1).")
flags.DEFINE_integer("seed", 0, "Seed (model init, data, sampling).")
flags.DEFINE_string("workdir", "/tmp/m1jax_rl", "Output directory.")

DS_LOSSES = ("dapo", "cispo", "cispo_masked")  # arms that use DAPO's dynamic sampling (spec 5.4)


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """Everything one RL run needs besides the initial params (see the flags for meanings)."""
    update: UpdateConfig
    rollout: RolloutConfig
    prompts: int = 16
    adv_norm: str = "group_std"
    dynamic_sampling: bool = False
    oversample: int = 2
    steps: int = 40
    eval_every: int = 10


# ------------------------------------------------------------------------------------------------ building blocks
def make_task():
    from m1jax.rl.tasks import ArithmeticTask, CharTokenizer
    return ArithmeticTask(min_digits=FLAGS.min_digits, max_digits=FLAGS.max_digits,
                          forget_prob=FLAGS.forget_prob), CharTokenizer()


def model_config(vocab_size: int, max_len: int):
    from m1jax.config import ModelConfig, m1_layer_types
    return ModelConfig.tiny(vocab_size=vocab_size, hidden_size=FLAGS.hidden, num_hidden_layers=FLAGS.layers,
                            layer_types=m1_layer_types(FLAGS.layers, FLAGS.period),
                            num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.heads,
                            head_dim=FLAGS.head_dim, rotary_dim=FLAGS.head_dim // 2,
                            intermediate_size=FLAGS.ffn, num_local_experts=FLAGS.experts,
                            max_position_embeddings=max_len, block_size=16, compute_dtype=FLAGS.compute_dtype,
                            lm_head_fp32=FLAGS.fp32_head)


def settings_from_flags():
    """RLSettings for --loss and its knobs."""
    from m1jax.rl.rollout import RolloutConfig
    from m1jax.rl.step import UpdateConfig
    knobs = {k: getattr(FLAGS, k) for k in ("ratio_max", "eps_is_high", "eps_low", "eps_high", "agg")
             if getattr(FLAGS, k) is not None}
    task, _ = make_task()
    ucfg = UpdateConfig(loss=FLAGS.loss, loss_knobs=tuple(knobs.items()), mu=FLAGS.mu, learning_rate=FLAGS.lr,
                        warmup_steps=FLAGS.warmup, eps=FLAGS.adam_eps, clip_norm=FLAGS.clip_norm,
                        fp32_head=FLAGS.fp32_head, old_logp=FLAGS.old_logp)
    rcfg = RolloutConfig(group_size=FLAGS.group_size, max_new_tokens=task.max_answer_tokens,
                         truncate_after=FLAGS.truncate_after, truncate_prob=FLAGS.truncate_prob)
    adv_norm = FLAGS.adv_norm or ("mean_only" if FLAGS.loss == "drgrpo" else "group_std")
    ds = FLAGS.loss in DS_LOSSES if FLAGS.dynamic_sampling is None else FLAGS.dynamic_sampling
    return RLSettings(update=ucfg, rollout=rcfg, prompts=FLAGS.prompts, adv_norm=adv_norm, dynamic_sampling=ds,
                      oversample=FLAGS.oversample, steps=FLAGS.rl_steps, eval_every=FLAGS.eval_every)


def pretrain(cfg, task, tokenizer, *, steps: int, batch: int, lr: float, seed: int, log=print):
    """SFT of a fresh model on the imperfect teacher's answers. Returns (graphdef, params)."""
    import jax.numpy as jnp
    import numpy as np

    from m1jax.rl.tasks import teacher_sft_batch
    from m1jax.train import TrainConfig, create_train_state, make_train_step

    tc = TrainConfig(learning_rate=lr, schedule="cosine", warmup_steps=max(1, steps // 20), total_steps=steps,
                     final_lr_ratio=0.1, eps=1e-8, weight_decay=0.01)
    graphdef, state = create_train_state(cfg, tc, seed=seed)
    train_step = make_train_step(graphdef, tc)
    rng = np.random.default_rng(seed + 1000)
    t0 = time.perf_counter()
    for i in range(steps):
        tokens, target = teacher_sft_batch(task, tokenizer, rng, batch)
        length = tokens.shape[1] - 1
        data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": target[:, 1:].astype(np.float32),
                "segment_ids": np.ones((batch, length), np.int32),
                "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))}
        state, metrics = train_step(state, {k: jnp.asarray(v) for k, v in data.items()})
        if i % max(1, steps // 10) == 0 or i == steps - 1:
            log(f"[sft] step {i:5d}  loss {float(metrics['loss']):.4f}  ({time.perf_counter() - t0:.0f}s)")
    return graphdef, state.params


def eval_set(task, tokenizer, n: int, seed: int):
    """A fixed held-out problem set (its own seed stream): (problems, prompt tokens [n, P], start [n])."""
    import numpy as np

    from m1jax.rl.rollout import prompt_batch
    return prompt_batch(task, tokenizer, np.random.default_rng(10_000 + seed), n)


def evaluate(graphdef, params, held_out, task, tokenizer, rcfg, samples: int, key):
    """Held-out accuracy (spec 5.4's evaluation). Returns

      acc               mean reward of `samples` samples per problem at temperature 1 (the analogue of avg@k)
      greedy_acc        the greedy answer's mean reward
      acc_carry, greedy_acc_carry   the same over the problems whose exact answer has a carry (the fork problems;
                        NaN if there are none)

    The greedy pass also decodes `samples` rows per problem (identical ones): one compiled program serves both passes
    (the sampler's temperature is a traced scalar), which on a latency-bound accelerator costs less than a second
    compilation of a smaller batch.
    """
    import numpy as np

    from m1jax.rl.rollout import sample_groups
    from m1jax.rl.tasks import batch_rewards
    problems, tokens, start = held_out
    carry = np.array([task.carry_in(p).any() for p in problems])  # [n]
    out = {}
    for name, cfg in (("acc", dataclasses.replace(rcfg, group_size=samples)),
                      ("greedy_acc", dataclasses.replace(rcfg, group_size=samples, temperature=0.0))):
        s = sample_groups(graphdef, params, tokens, start, key, cfg)
        rewards = batch_rewards(task, [p for p in problems for _ in range(cfg.group_size)], s.responses, tokenizer)
        per_problem = rewards.reshape(len(problems), cfg.group_size).mean(axis=1)  # [n]
        out[name] = float(per_problem.mean())
        out[name + "_carry"] = float(per_problem[carry].mean()) if carry.any() else float("nan")
    return out


def run_rl(graphdef, params, settings: RLSettings, task, tokenizer, held_out, *, seed: int, eval_samples: int,
           log=print, on_record=None, update=None, arm: int = 0):
    """RL from `params` (not modified: the update works on a copy). Returns (records, final params, opt state).

    A record has step, reward_mean (over all sampled groups), mixed_frac, the update metrics (minibatch means, plus
    ``mismatch_pearson``/``mismatch_max_abs_logp`` of the first minibatch and per-minibatch lists of the clip
    fractions), timings, and on evaluation steps ``evaluate``'s accuracies and eval_s. `on_record(record)` is called
    for each.
    `update`/`arm`: a prebuilt multi-arm update (``make_rl_update(..., alternatives)``) and the arm to run; by
    default one is built for settings.update.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m1jax.rl.rollout import prompt_batch, sample_groups, score_groups
    from m1jax.rl.step import init_opt_state, make_rl_update

    ucfg, rcfg = settings.update, settings.rollout
    params = jax.tree_util.tree_map(jnp.copy, params)  # the update donates its params
    # Commit every input to the device, as the update's outputs are: an uncommitted leaf (the optimizer's step count)
    # would make the second update compile again (same trace, different input placement).
    params, opt_state = jax.device_put((params, init_opt_state(params, ucfg)), jax.devices()[0])
    update = make_rl_update(graphdef, ucfg) if update is None else update
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    n_prompts = settings.prompts * (settings.oversample if settings.dynamic_sampling else 1)
    records = []
    for step in range(settings.steps + 1):
        record = {"step": step}
        if step % settings.eval_every == 0 or step == settings.steps:
            t_eval = time.perf_counter()
            record.update(evaluate(graphdef, params, held_out, task, tokenizer, rcfg, eval_samples,
                                   jax.random.fold_in(jax.random.fold_in(key, 1 << 30), step)))
            record["eval_s"] = time.perf_counter() - t_eval
        if step < settings.steps:
            t0 = time.perf_counter()
            problems, tokens, start = prompt_batch(task, tokenizer, rng, n_prompts)
            samples = sample_groups(graphdef, params, tokens, start, jax.random.fold_in(key, step), rcfg)
            t1 = time.perf_counter()
            batch, stats = score_groups(samples, problems, task, tokenizer, group_size=rcfg.group_size,
                                        num_groups=settings.prompts, adv_norm=settings.adv_norm,
                                        dynamic_sampling=settings.dynamic_sampling, minibatches=settings.update.mu)
            t2 = time.perf_counter()
            params, opt_state, metrics = update(params, opt_state, batch.arrays(), arm)
            metrics = jax.device_get(metrics)
            t3 = time.perf_counter()
            record.update(stats)
            record.update(_summarise(metrics))
            record.update(rollout_s=t1 - t0, score_s=t2 - t1, update_s=t3 - t2,
                          rollout_tokens=int(samples.lengths.sum()), update_tokens=int(batch.tokens.size))
        records.append(record)
        if on_record is not None:
            on_record(record)
        if "acc" in record:
            log(f"[rl {ucfg.loss} mu={ucfg.mu}] step {step:4d}  acc {record['acc']:.3f}  greedy "
                f"{record['greedy_acc']:.3f}" + (f"  reward {record['reward_mean']:.3f}  mismatch r "
                                                 f"{record['mismatch_pearson']:.5f}" if "reward_mean" in record
                                                 else ""))
    return records, params, opt_state


def _summarise(metrics) -> dict:
    """[mu] per-minibatch metrics -> scalars (means; the mismatch metrics of minibatch 0) + clip-fraction lists.

    A minibatch made only of dynamic-sampling padding has no tokens; its ratio extrema are -inf/inf and are skipped.
    """
    import numpy as np
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, np.float64)
        out[k] = float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
    for k in ("mismatch_pearson", "mismatch_max_abs_logp"):
        out[k] = float(metrics[k][0])
    for k in ("ppo_clip_frac", "is_cap_frac", "ratio_max"):
        if k in metrics and np.isfinite(metrics[k]).all():  # NaN: a metric the loss does not produce
            out[k + "_by_minibatch"] = [float(x) for x in metrics[k]]
    return out


# ------------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(directory: str, cfg, state: dict, step: int = 0) -> str:
    """Orbax checkpoint (m1jax.checkpoint) of `state` ({"params": ..., optionally "opt_state": ...}) at `step`, plus
    the model's config.json beside it. Returns the directory.

    A checkpoint already in `directory` (an earlier run with the same --workdir) is replaced: the new one is written
    beside it and swapped in by renames, so a crash leaves the old or the new checkpoint, never a mix.
    """
    import shutil

    from m1jax.checkpoint import Checkpointer
    directory = os.path.abspath(directory)
    writing, old = directory + ".writing", directory + ".old"
    for leftover in (writing, old):  # from a run that crashed mid-swap
        shutil.rmtree(leftover, ignore_errors=True)
    checkpointer = Checkpointer(writing, max_to_keep=1, async_save=False)
    checkpointer.save(step, state, force=True)
    checkpointer.close()
    with open(os.path.join(writing, "config.json"), "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=1)
    if os.path.exists(directory):
        os.rename(directory, old)
    os.rename(writing, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_policy(directory: str, **config_overrides):
    """(cfg, graphdef, params) from ``save_checkpoint``'s directory (its latest step); config fields can be
    overridden (e.g. compute_dtype, lm_head_fp32: they change no parameter)."""
    import jax

    from m1jax.checkpoint import Checkpointer
    from m1jax.config import ModelConfig
    from m1jax.model import abstract_model
    from m1jax.train import split_model
    with open(os.path.join(directory, "config.json")) as fh:
        cfg = ModelConfig(**json.load(fh)).replace(**config_overrides)
    graphdef, abstract = split_model(abstract_model(cfg))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    checkpointer = Checkpointer(directory, async_save=False)
    state, _ = checkpointer.restore({"params": target})
    checkpointer.close()
    return cfg, graphdef, state["params"]


# ------------------------------------------------------------------------------------------------ outputs
class MetricsWriter:
    """JSONL always; TensorBoard scalars when tensorboardX is installed."""

    def __init__(self, directory: str, run_name: str = "rl"):
        os.makedirs(directory, exist_ok=True)
        self._jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        self._run = run_name
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(directory, "tb", run_name))
        except ImportError:
            self._tb = None
            print("tensorboardX not installed: metrics go to metrics.jsonl only (pip install tensorboardX)")

    def write(self, record: dict, **extra):
        self._jsonl.write(json.dumps(dict(record, run=self._run, **extra)) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self):
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def plot_accuracy(curves: dict, path: str, title: str) -> bool:
    """curves: label -> (steps, values[, lower, upper]). Writes a PNG; False (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no {path} (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        line, = ax.plot(curve[0], curve[1], label=label)
        if len(curve) == 4:
            ax.fill_between(curve[0], curve[2], curve[3], alpha=0.15, color=line.get_color())
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy (sampled, T=1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------ main
def prepare_policy(task, tokenizer, log=print):
    """(cfg, graphdef, params): loaded from --init_checkpoint, or pretrained now and saved to workdir/pretrained."""
    if FLAGS.init_checkpoint:
        cfg, graphdef, params = load_policy(FLAGS.init_checkpoint, compute_dtype=FLAGS.compute_dtype,
                                            lm_head_fp32=FLAGS.fp32_head)
        log(f"loaded the pretrained policy from {FLAGS.init_checkpoint}")
        return cfg, graphdef, params
    cfg = model_config(tokenizer.vocab_size, task.max_prompt_tokens + task.max_answer_tokens)
    log(f"model: {cfg.num_hidden_layers} layers {cfg.layer_types}, hidden {cfg.hidden_size}, "
        f"{cfg.num_local_experts} experts; {cfg.param_counts()['total'] / 1e6:.2f}M params")
    graphdef, params = pretrain(cfg, task, tokenizer, steps=FLAGS.sft_steps, batch=FLAGS.sft_batch,
                                lr=FLAGS.sft_lr, seed=FLAGS.seed, log=log)
    path = save_checkpoint(os.path.join(FLAGS.workdir, "pretrained"), cfg, {"params": params})
    log(f"saved the pretrained policy to {path}")
    return cfg, graphdef, params


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731
    task, tokenizer = make_task()
    cfg, graphdef, params = prepare_policy(task, tokenizer, log)
    settings = settings_from_flags()
    held_out = eval_set(task, tokenizer, FLAGS.eval_problems, FLAGS.seed)
    writer = MetricsWriter(FLAGS.workdir, f"{FLAGS.loss}_mu{FLAGS.mu}_seed{FLAGS.seed}")
    records, params, opt_state = run_rl(graphdef, params, settings, task, tokenizer, held_out, seed=FLAGS.seed,
                                        eval_samples=FLAGS.eval_samples, log=log, on_record=writer.write)
    writer.close()
    save_checkpoint(os.path.join(FLAGS.workdir, "rl_checkpoint"), cfg, {"params": params, "opt_state": opt_state},
                    step=settings.steps)
    evals = [r for r in records if "acc" in r]
    log(f"accuracy {evals[0]['acc']:.3f} -> {evals[-1]['acc']:.3f} (greedy {evals[0]['greedy_acc']:.3f} -> "
        f"{evals[-1]['greedy_acc']:.3f}) over {settings.steps} RL steps; metrics in "
        f"{os.path.join(FLAGS.workdir, 'metrics.jsonl')}")
    if plot_accuracy({f"{FLAGS.loss} mu={FLAGS.mu}": ([r["step"] for r in evals], [r["acc"] for r in evals])},
                     os.path.join(FLAGS.workdir, "accuracy.png"), "RL on noisy-carry addition"):
        log(f"wrote {os.path.join(FLAGS.workdir, 'accuracy.png')}")


if __name__ == "__main__":
    app.run(main)
