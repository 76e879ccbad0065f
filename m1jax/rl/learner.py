"""The RL learner: rollout -> score -> advantages (+ dynamic sampling) -> update, evaluation, checkpoints, metrics.

Task-agnostic: everything it knows about a task is the ``m1jax.rl.task.Task`` interface (problems, prompt tokens, a
reward function, pad/stop ids, lengths, optional evaluation subsets). One RL step (``Learner.step``):

1. problems: ``task.sample`` with a generator seeded by (seed, step), so a resumed run draws the same problems;
2. rollout: one jitted program samples G responses per prompt (``m1jax.rl.rollout.sample``), on the mesh;
3. score: each process runs ``task.reward`` on the rows its devices hold; the rewards (a float per row) are
   all-gathered, so every process computes the same group selection and advantages (``m1jax.rl.scoring``);
4. the selected rows are gathered on device into the update batch, split over the mesh's batch axes;
5. update: the jitted mu-minibatch update (``m1jax.rl.step``), params and optimizer state placed by the
   logical-axis rules (``sharding.rules.state_shardings``).

Without a mesh (one process) everything runs on the first device. ``RLState`` (step, params, optimizer state) is the
whole state of a run: randomness is derived from (seed, step), so ``save_state``/``restore_state`` and the same
configs resume a run exactly.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from m1jax.config import Config, ConfigError, setting
from m1jax.rl.advantages import ADVANTAGE_NORMS
from m1jax.rl.placement import Placement
from m1jax.rl.rollout import Rollout, RolloutConfig, repeat_rows, sample
from m1jax.rl.scoring import gather_update_batch, rollout_stats, select_groups
from m1jax.rl.step import UpdateConfig, init_opt_state, make_rl_update
from m1jax.rl.task import Task, decision_masks, encode_prompts
from sharding.multihost import any_process

DS_LOSSES = ("dapo", "cispo", "cispo_masked")  # losses whose recipe includes DAPO's dynamic sampling
_TRAIN_STREAM, _EVAL_STREAM = 0, 1  # generator seeds (seed, stream, ...) of training and held-out problems
_EVAL_KEY = 1 << 30  # fold-in of the evaluation sampling keys


@dataclasses.dataclass(frozen=True)
class RLConfig(Config):
    """The RL loop. ``adv_norm``/``dynamic_sampling`` None take the loss's recipe (``resolved``)."""
    prompts: int = setting(16, help="groups (prompts) per update batch, P")
    adv_norm: str | None = setting(None, choices=ADVANTAGE_NORMS,
                                   help="advantage norm (None: mean_only for drgrpo, else group_std)")
    dynamic_sampling: bool | None = setting(None, help="DAPO dynamic sampling (None: on for dapo/cispo/cispo_masked)")
    oversample: int = setting(2, help="prompts sampled per kept group under dynamic sampling")
    steps: int = setting(40, resume=False, help="RL steps (rollout batches); a resumed run may extend it")
    eval_every: int = setting(5, resume=False, help="evaluate every this many steps (and at the last)")
    eval_problems: int = setting(32, help="held-out problems")
    eval_samples: int = setting(8, help="samples per held-out problem at temperature 1")
    eval_seed: int = setting(0, help="seed of the held-out problems")
    seed: int = setting(0, help="seed of the problems and the sampling")
    checkpoint_every: int = setting(0, resume=False, help="checkpoint every this many steps (0: at the end only)")

    def validate(self) -> None:
        for name in ("prompts", "oversample", "eval_every", "eval_problems", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RLConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.checkpoint_every < 0:
            raise ConfigError("RLConfig.steps and checkpoint_every must be >= 0")

    def resolved(self, loss: str) -> "RLConfig":
        """adv_norm and dynamic_sampling filled in from the loss's recipe where None."""
        return self.replace(
            adv_norm=self.adv_norm or ("mean_only" if loss == "drgrpo" else "group_std"),
            dynamic_sampling=loss in DS_LOSSES if self.dynamic_sampling is None else self.dynamic_sampling)


@dataclasses.dataclass(frozen=True)
class RLState:
    """The state of an RL run: ``step`` RL steps done (host int), params and optimizer state (device pytrees)."""
    step: int
    params: Any
    opt_state: Any

    def arrays(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}


@functools.lru_cache(maxsize=16)
def _update_program(graphdef, update: UpdateConfig, alternatives: tuple, mesh):
    """Learners of one model, update config and mesh share the compiled update (a benchmark builds one learner per
    run; the update keeps the placement of its first call, hence the mesh in the key)."""
    del mesh
    return make_rl_update(graphdef, update, alternatives)


class Learner:
    """RL on ``task`` for the model ``graphdef`` (see the module docstring).

    config: the loop (its None recipe fields resolved from ``update.loss``); update, rollout: the update and the
    sampling. mesh: a mesh over all processes' devices (``sharding.mesh.make_mesh``), or None for one device.
    alternatives: further UpdateConfigs compiled into the same update program (``make_rl_update``); ``run``'s
    ``arm`` picks one (0: ``update``).
    """

    def __init__(self, graphdef, task: Task, *, config: RLConfig, update: UpdateConfig, rollout: RolloutConfig,
                 mesh: jax.sharding.Mesh | None = None, alternatives: Sequence[UpdateConfig] = ()):
        self.graphdef, self.task = graphdef, task
        self.config = config.resolved(update.loss)
        self.rollout_config = rollout
        self.arms = (update,) + tuple(alternatives)
        self.place = Placement(mesh)
        self._update = _update_program(graphdef, update, tuple(alternatives), mesh)
        self._key = jax.random.key(self.config.seed)
        self.held_out = list(task.sample(np.random.default_rng([self.config.eval_seed, _EVAL_STREAM]),
                                         self.config.eval_problems))
        # Whether the task marks decision points (``Task.decision_mask``): the update then reports the clip
        # fractions and gradient share at them. Asked once, on a held-out problem and an empty completion.
        self.decisions = decision_masks(task, self.held_out[:1], np.full((1, task.max_new_tokens), task.pad_id,
                                                                         np.int32)) is not None

    # ------------------------------------------------------------------------------------------------ state
    def init_state(self, params) -> RLState:
        """Step 0 from ``params`` (copied and placed; the caller's arrays are not donated)."""
        params = self.place.state(params)
        return RLState(step=0, params=params, opt_state=init_opt_state(params, self.arms[0]))

    # ------------------------------------------------------------------------------------------------ phases
    def problems(self, step: int) -> list:
        """The problems of RL step ``step``: P, or P x oversample under dynamic sampling (the same on every
        process)."""
        cfg = self.config
        n = cfg.prompts * (cfg.oversample if cfg.dynamic_sampling else 1)
        return list(self.task.sample(np.random.default_rng([cfg.seed, _TRAIN_STREAM, step]), n))

    def rollout(self, params, problems: Sequence[Any], key, *, group_size: int,
                temperature: float | None = None) -> Rollout:
        """G = group_size samples for each problem: a Rollout of len(problems) * G rows (group i at rows i*G ..)."""
        tokens, start = repeat_rows(*encode_prompts(self.task, problems), group_size)
        with self.place.context():
            return sample(self.graphdef, params, self.place.rows(tokens), self.place.rows(start), key,
                          self.rollout_config, pad_id=self.task.pad_id, stop_ids=self.task.stop_ids,
                          max_new_tokens=self.task.max_new_tokens, temperature=temperature)

    def score_rows(self, rollout: Rollout, problems: Sequence[Any], group_size: int, *,
                   decisions: bool = False) -> dict[str, np.ndarray]:
        """rewards, lengths and stop_reason [R] of every row, on every process: each process scores the rows its
        devices hold with ``task.reward``, then the per-row values are all-gathered. With ``decisions`` (and a task
        that marks them) also ``decision`` [R, N] float32, the task's decision points of each response."""
        rows, responses = self.place.host_rows(rollout.responses)
        _, lengths = self.place.host_rows(rollout.lengths)
        _, reasons = self.place.host_rows(rollout.stop_reason)
        row_problems = [problems[r // group_size] for r in rows.tolist()]
        rewards = [self.task.reward(p, c) for p, c in zip(row_problems, responses)]
        columns = [np.asarray(rewards, np.float32)[:, None], lengths.astype(np.float32)[:, None],
                   reasons.astype(np.float32)[:, None]]
        marked = decision_masks(self.task, row_problems, responses) if decisions and self.decisions else None
        if marked is not None:
            columns.append(marked.astype(np.float32))
        full = self.place.gather_rows(rows, np.concatenate(columns, axis=1), rollout.responses.shape[0])
        out = {"rewards": full[:, 0], "lengths": full[:, 1].astype(np.int32), "stop_reason": full[:, 2].astype(np.int32)}
        if marked is not None:
            out["decision"] = full[:, 3:]
        return out

    def score(self, rollout: Rollout, problems: Sequence[Any]) -> tuple[dict, dict]:
        """(update batch of P * G rows on device, stats): rewards, group selection and advantages (host), the
        selected rows gathered on device."""
        cfg, g = self.config, self.rollout_config.group_size
        scored = self.score_rows(rollout, problems, g, decisions=True)
        selection, stats = select_groups(scored["rewards"], group_size=g, num_groups=cfg.prompts,
                                         adv_norm=cfg.adv_norm, dynamic_sampling=cfg.dynamic_sampling,
                                         minibatches=self.arms[0].mu)
        stats.update(rollout_stats(scored["lengths"], scored["stop_reason"]))
        with self.place.context():
            batch = gather_update_batch(rollout, selection, put=self.place.replicated,
                                        decision=scored.get("decision"))
        return batch, stats

    def update(self, state: RLState, batch: dict, arm: int = 0) -> tuple[RLState, dict]:
        """The mu minibatch updates of one rollout batch: (next state, summarised metrics)."""
        with self.place.context():
            params, opt_state, metrics = self._update(state.params, state.opt_state, batch, arm)
        return RLState(step=state.step + 1, params=params, opt_state=opt_state), summarise(
            jax.device_get(metrics), decisions=self.decisions)

    def step(self, state: RLState, arm: int = 0) -> tuple[RLState, dict]:
        """One RL step (module docstring) from ``state``: (next state, record of stats, update metrics, timings)."""
        t0 = time.perf_counter()
        problems = self.problems(state.step)
        rollout = jax.block_until_ready(self.rollout(state.params, problems, jax.random.fold_in(self._key, state.step),
                                                     group_size=self.rollout_config.group_size))
        t1 = time.perf_counter()
        batch, stats = self.score(rollout, problems)
        t2 = time.perf_counter()
        state, metrics = self.update(state, batch, arm)
        t3 = time.perf_counter()
        return state, {**stats, **metrics, "rollout_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2,
                       "update_tokens": int(np.prod(batch["tokens"].shape))}

    def evaluate(self, params, key) -> dict[str, float]:
        """Accuracy on the held-out problems:

          acc          mean reward of eval_samples samples per problem at temperature 1 (the analogue of avg@k)
          greedy_acc   the greedy answer's mean reward
          acc_<name>, greedy_acc_<name>   the same over each of ``task.eval_subsets`` (NaN if it is empty)

        The greedy pass also decodes eval_samples rows per problem (identical ones): one compiled program serves
        both passes (the temperature is traced), cheaper than a second compilation on a latency-bound device.
        """
        problems, samples = self.held_out, self.config.eval_samples
        subsets = {k: np.asarray(v, bool) for k, v in self.task.eval_subsets(problems).items()}
        out = {}
        for name, temperature in (("acc", 1.0), ("greedy_acc", 0.0)):
            rollout = self.rollout(params, problems, key, group_size=samples, temperature=temperature)
            rewards = self.score_rows(rollout, problems, samples)["rewards"]
            per_problem = rewards.reshape(len(problems), samples).mean(axis=1)
            out[name] = float(per_problem.mean())
            for subset, mask in subsets.items():
                out[f"{name}_{subset}"] = float(per_problem[mask].mean()) if mask.any() else float("nan")
        return out

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, state: RLState, *, arm: int = 0, metrics=None, checkpointer=None,
            on_record: Callable[[dict], None] | None = None, stop_requested: Callable[[], bool] | None = None,
            log=print) -> tuple[RLState, list[dict]]:
        """RL from ``state`` to ``config.steps``. Returns (final state, records).

        A record per step s: {"step": s} + on evaluation steps (every eval_every, and the last) ``evaluate``'s
        accuracies and eval_s, measured before update s; + for s < steps the stats, update metrics and timings of
        ``step``. Each record goes to ``metrics`` (an ``m1jax.metrics.MetricsLogger``) and ``on_record``; each
        evaluation prints a progress line through ``log``.
        checkpointer: an ``m1jax.checkpoint.Checkpointer``; the state is saved every ``checkpoint_every`` steps and
        at the end (``save_state``). stop_requested: polled before each step (agreed by all processes); when it
        returns True the state is saved and the loop returns early (preemption).
        """
        cfg, ucfg = self.config, self.arms[arm]
        first, records = state.step, []
        for s in range(first, cfg.steps + 1):
            due = s == cfg.steps or (cfg.checkpoint_every and s % cfg.checkpoint_every == 0)
            stop = stop_requested is not None and any_process(stop_requested())
            if checkpointer is not None and s > first and (due or stop):
                save_state(checkpointer, state)
            if stop:
                log(f"stop requested: state saved at step {s}" if checkpointer is not None else "stop requested")
                break
            record = {"step": s}
            if s % cfg.eval_every == 0 or s == cfg.steps:
                t = time.perf_counter()
                record.update(self.evaluate(state.params, jax.random.fold_in(jax.random.fold_in(
                    self._key, _EVAL_KEY), s)))
                record["eval_s"] = time.perf_counter() - t
            if s < cfg.steps:
                state, stats = self.step(state, arm)
                record.update(stats)
            records.append(record)
            if metrics is not None:
                metrics.write(s, {k: v for k, v in record.items() if k != "step"})
            if on_record is not None:
                on_record(record)
            if "acc" in record:
                log(f"[rl {ucfg.loss} mu={ucfg.mu}] step {s:4d}  acc {record['acc']:.3f}  greedy "
                    f"{record['greedy_acc']:.3f}" + (f"  reward {record['reward_mean']:.3f}  mismatch r "
                                                     f"{record['mismatch_pearson']:.5f}" if "reward_mean" in record
                                                     else ""))
        if checkpointer is not None:
            checkpointer.wait()
        return state, records


# ------------------------------------------------------------------------------------------------ checkpoints
def save_state(checkpointer, state: RLState) -> None:
    """Save ``state`` as checkpoint step ``state.step`` (asynchronously; ``checkpointer.wait()`` to finish)."""
    checkpointer.save(state.step, state.arrays(), force=True)


def restore_state(checkpointer, like: RLState, step: int | None = None) -> RLState:
    """The state saved at ``step`` (default: the latest), read onto the shapes and shardings of ``like`` (e.g.
    ``Learner.init_state(params)``)."""
    step = checkpointer.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                      like.arrays())
    arrays, _ = checkpointer.restore(abstract, step)
    return RLState(step=int(step), params=arrays["params"], opt_state=arrays["opt_state"])


# ------------------------------------------------------------------------------------------------ metrics
BY_MINIBATCH = ("ppo_clip_frac", "is_cap_frac", "trust_region_frac", "ratio_max", "ppo_clip_frac_decision",
                "is_cap_frac_decision", "trust_region_frac_decision", "grad_share_decision")
DECISION_METRICS = ("decision_frac", "grad_share_decision")  # and every "<clip fraction>_decision"


def summarise(metrics: dict, decisions: bool = True) -> dict:
    """[mu] per-minibatch update metrics -> scalars (means over the minibatches where the metric is defined; the
    mismatch metrics of minibatch 0) + per-minibatch lists ``<name>_by_minibatch`` of the clip fractions, the
    ratio maximum and the decision points' gradient share (NaN where undefined). decisions=False drops the
    decision-point metrics (the task marks none).

    A minibatch made only of dynamic-sampling padding has no tokens; its ratio extrema are -inf/inf and its
    decision metrics NaN, and they are skipped in the means. A metric that the chosen loss does not produce is NaN
    in every minibatch and is left out.
    """
    if not decisions:
        metrics = {k: v for k, v in metrics.items() if k not in DECISION_METRICS and not k.endswith("_decision")}
    out = {}
    for k, v in metrics.items():
        v = np.asarray(v, np.float64)
        if np.isnan(v).all():  # not produced by this loss (another arm's metric in a shared program)
            continue
        out[k] = float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else float("nan")
    for k in ("mismatch_pearson", "mismatch_max_abs_logp"):
        out[k] = float(metrics[k][0])
    for k in BY_MINIBATCH:
        if k in metrics and not np.isnan(np.asarray(metrics[k], np.float64)).all():
            out[k + "_by_minibatch"] = [float(x) if np.isfinite(x) else float("nan") for x in metrics[k]]
    return out
