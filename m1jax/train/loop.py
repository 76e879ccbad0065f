"""The training loop: ``Trainer(model, train, run, workdir).fit(resume=...)``.

The trainer owns the jitted step, the data loader (each process reads only its rows of the global batch), the
orbax checkpoints (state + every process's data state, saved every ``run.save_every`` steps and at the end), the
resume rules of the run directory (``m1jax.train.run_dir``), evaluation hooks, preemption (SIGTERM/SIGINT on any
process stops every process after the same step, which is then saved) and the metrics (``m1jax.metrics``: one
JSONL record per step, TensorBoard, optionally W&B; written by process 0) with a progress line on stdout.

Faults (``docs/training.md``, "Faults"): a step whose loss or gradient norm is not finite stops the run with
``NonFiniteError`` naming it, before anything of it is saved (``run.on_nonfinite=stop``), or has its update skipped
(``skip``); a resume restores the newest checkpoint that verifies, setting damaged newer ones aside with a warning.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Mapping

import jax

from m1jax import checkpoint as ckpt
from m1jax.config import ConfigError, ModelConfig
from m1jax.config.files import write_config
from m1jax.data import ShardedBatchLoader, make_source
from m1jax.data.batch import BATCH_KEYS
from m1jax.checkpoint import NonFiniteError
from m1jax.metrics import MetricsLogger
from m1jax.train.config import RunConfig, TrainConfig
from m1jax.train.evaluation import Evaluator, make_loss_evaluator
from m1jax.train.flops import peak_tflops, train_flops_per_token
from m1jax.train.preemption import PreemptionGuard
from m1jax.train.progress import progress_line
from m1jax.train.run_dir import check_start, checkpoint_dir
from m1jax.train.state import (TrainState, abstract_train_state, create_train_state, init_train_state,
                               train_state_shardings)
from m1jax.train.step import host_metrics, make_train_step
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding

EVAL_SEED_OFFSET = 1_000_003  # the held-out stream's seed: run.seed + this, so it never replays a training stream


class Trainer:
    """One training run in ``workdir`` (see the module docstring).

    ``mesh``: default ``sharding.mesh.make_mesh(run.mesh)`` over every process's devices. ``evaluators``: extra
    evaluation hooks ``{name: state -> {metric: value}}``, called every ``run.eval_every`` steps and at the last
    step; with ``run.eval_data`` the held-out loss is added as ``eval``. ``log`` prints (process 0 only for the
    progress lines).
    """

    def __init__(self, model: ModelConfig, train: TrainConfig, run: RunConfig, workdir: str | os.PathLike, *,
                 mesh: jax.sharding.Mesh | None = None, evaluators: Mapping[str, Evaluator] | None = None,
                 log: Callable[[str], None] = print):
        self.model_cfg, self.tc, self.run = model, train, run
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.log = log
        self.primary = jax.process_index() == 0
        if mesh is None:
            try:
                mesh = make_mesh(run.mesh)
            except ValueError as e:
                raise ConfigError(f"run.mesh: {e}") from None
        self.mesh = mesh
        self.source = make_source(run.data, run.seq_len, run.seed, max_position=model.max_position_embeddings)
        if self.source.vocab_size > model.vocab_size:
            raise ConfigError(f"data {run.data!r} has a vocabulary of {self.source.vocab_size}, more than the "
                              f"model's vocab_size {model.vocab_size}")
        if run.batch % train.grad_accum:
            raise ConfigError(f"run.batch {run.batch} is not divisible by train.grad_accum {train.grad_accum}")
        self.seq_len = self.source.seq_len
        self.graphdef, self.abstract = abstract_train_state(model, train)
        self.state_shardings = train_state_shardings(self.abstract, mesh, run.fsdp)
        self.batch_sharding = batch_sharding(mesh, (run.batch, self.seq_len))
        batch_shardings = {k: self.batch_sharding for k in BATCH_KEYS}
        self.step_fn = make_train_step(self.graphdef, train, self.state_shardings, batch_shardings, fsdp=run.fsdp,
                                       skip_nonfinite=run.on_nonfinite == "skip")
        self.flops = train_flops_per_token(model, self.seq_len)
        self.peak = run.peak_tflops or peak_tflops()
        self.evaluators = dict(evaluators or {})
        if run.eval_data is not None:
            held_out = make_source(run.eval_data, self.seq_len, (run.seed + EVAL_SEED_OFFSET) % 2**32,
                                   max_position=model.max_position_embeddings)
            self.evaluators.setdefault("eval", make_loss_evaluator(
                self.graphdef, train, lambda: ShardedBatchLoader(held_out, run.batch, self.batch_sharding),
                run.eval_batches, param_shardings=self.state_shardings.params, batch_shardings=batch_shardings,
                fsdp=run.fsdp))
        if run.eval_every and not self.evaluators:
            raise ConfigError("run.eval_every is set but there is nothing to evaluate: set run.eval_data")
        self.state: TrainState | None = None

    # ------------------------------------------------------------------------------------------------ state
    def initial_state(self) -> TrainState:
        """Step 0: fresh parameters (``run.seed``), or ``run.init_params`` read onto the mesh."""
        run = self.run
        if run.init_params is None:
            _, state = create_train_state(self.model_cfg, self.tc, seed=run.seed, mesh=self.mesh, fsdp=run.fsdp)
            return state
        params = ckpt.load_params(run.init_params,
                                  ckpt.with_shardings(self.abstract.params, self.state_shardings.params))
        return jax.jit(lambda p: init_train_state(p, self.tc, run.seed), out_shardings=self.state_shardings)(params)

    def _say(self, text: str) -> None:
        if self.primary:
            self.log(text)

    def _restore_or_init(self, checkpointer: ckpt.Checkpointer, loader: ShardedBatchLoader,
                         resume: bool) -> tuple[TrainState, int | None]:
        """(state, the step restored or None): the newest intact checkpoint (state and loader) when resuming, else
        step 0. Damaged newer checkpoints are named and set aside; no intact one at all is a CheckpointError."""
        for path in checkpointer.interrupted_saves:
            self._say(f"warning: removed {path}: a save that never finished (the run was killed while saving)")
        if not (resume and checkpointer.all_steps()):
            if resume:
                self._say(f"nothing to resume in {checkpointer.directory}: starting at step 0")
            return self.initial_state(), None
        target = ckpt.with_shardings(self.abstract, self.state_shardings)
        start, state, data_states, damaged = checkpointer.restore_latest_intact(target)
        for error in damaged:
            self._say(f"warning: {error}; resuming from the previous intact checkpoint {checkpointer.step_path(start)}")
        if damaged:
            steps = [s for s in checkpointer.all_steps() if s > start]
            for path in checkpointer.set_aside(steps):
                self._say(f"warning: moved the damaged checkpoint to {path}")
        loader.restore(data_states)
        self.log(f"resumed from {checkpointer.step_path(start)}")
        return state, start

    def _step_values(self, step: int, state: TrainState, values: dict[str, float],
                     seconds: float) -> dict[str, float]:
        """The metrics record of ``step``: the step's metrics, throughput, MFU, and the evaluations due."""
        run = self.run
        values["step_time_s"] = seconds
        values["tokens_per_s"] = run.batch * self.seq_len / seconds
        if self.peak:
            values["mfu"] = self.flops * values["tokens_per_s"] / (self.peak * 1e12 * self.mesh.size)
        if self.evaluators and run.eval_every and (step % run.eval_every == 0 or step == run.steps):
            for name, evaluate in self.evaluators.items():
                values.update({f"{name}/{k}": float(v) for k, v in evaluate(state).items()})
        return values

    def _nonfinite(self, step: int, values: dict[str, float], last_saved: int | None, directory: str) -> None:
        """A step whose loss or gradient norm is not finite: a warning (``skip``: the step dropped its update) or the
        end of the run (``NonFiniteError``; the state is not saved)."""
        what = (f"step {step}: loss {values['loss']:.6g}, balance loss {values['aux_loss']:.6g}, grad norm "
                f"{values['grad_norm']:.6g}")
        if self.run.on_nonfinite == "skip":
            self._say(f"warning: {what} is not finite: its update was skipped (run.on_nonfinite=skip)")
            return
        last = ("no checkpoint was saved" if last_saved is None
                else f"the last checkpoint is step {last_saved} in {directory}")
        raise NonFiniteError(f"{what} is not finite: stopped without saving it; {last}. Resume from it (--resume) "
                             f"with a lower learning rate (--allow_config_change), or skip such updates with "
                             f"--set run.on_nonfinite=skip")

    # ------------------------------------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = False, allow_config_change: bool = False,
            pause_at_step: int | None = None) -> TrainState:
        """Train until ``run.steps`` (or a stop signal) and return the final state.

        ``resume``: continue from the newest intact checkpoint in the work directory (refused on a conflicting
        config unless ``allow_config_change``). ``pause_at_step``: a preemption drill for tests: after that step and
        its checkpoint are written, print ``PAUSED at step N`` and wait for a signal.

        Raises ``NonFiniteError`` when a step's loss or gradient norm is not finite (``run.on_nonfinite=stop``),
        ``CheckpointError`` when resuming finds no intact checkpoint; a second SIGINT raises KeyboardInterrupt.
        """
        run, tc = self.run, self.tc
        for line in check_start(self.workdir, {"model": self.model_cfg, "train": tc, "run": run}, resume=resume,
                                allow_config_change=allow_config_change):
            self._say(f"config change accepted: {line}")
        if self.primary:
            write_config(self.workdir, model=self.model_cfg, train=tc, run=run)
        checkpointer = ckpt.Checkpointer(checkpoint_dir(self.workdir), max_to_keep=run.keep)
        metrics = None
        # The guard covers the restore and the final wait too: a signal at any point ends in a clean save and exit.
        with PreemptionGuard() as guard:
            try:
                loader = ShardedBatchLoader(self.source, run.batch, self.batch_sharding)
                state, start = self._restore_or_init(checkpointer, loader, resume)
                metrics = MetricsLogger(self.workdir, resume_step=start or 0, wandb=run.wandb, enabled=self.primary,
                                        log=self.log)
                state, step = self._loop(state, start, checkpointer, loader, metrics, guard, pause_at_step)
            except KeyboardInterrupt:  # a second Ctrl-C: the user abandons the save in flight, so do not wait for it
                checkpointer = None
                raise
            finally:  # otherwise an in-flight save completes even when the loop fails
                try:
                    if checkpointer is not None:
                        checkpointer.close()
                finally:
                    if metrics is not None:
                        metrics.close()
        self._say(f"done at step {step}; checkpoints {checkpointer.all_steps()} in {checkpointer.directory}")
        self.state = state
        return state

    def _loop(self, state: TrainState, start: int | None, checkpointer: ckpt.Checkpointer,
              loader: ShardedBatchLoader, metrics: MetricsLogger, guard: PreemptionGuard,
              pause_at_step: int | None) -> tuple[TrainState, int]:
        run = self.run
        step = int(state.step)
        counts = self.model_cfg.param_counts()
        self._say(f"model {counts['total']:,} params ({counts['active_with_head']:,} active with head); mesh "
                  f"{dict(zip(self.mesh.axis_names, self.mesh.axis_sizes))} over {jax.process_count()} "
                  f"process(es); batch {run.batch} x {self.seq_len}; {self.flops / 1e9:.3f} GFLOP/token")
        last_saved = start

        def save(at_step: int, data_state: dict) -> None:  # every process, at the same step
            nonlocal last_saved
            if last_saved != at_step:
                checkpointer.save(at_step, state, data_state, force=True)
                last_saved = at_step

        data_state = loader.state()
        stop = guard.agreed()
        batch = next(loader) if step < run.steps else None
        while step < run.steps and not stop:
            t0 = time.perf_counter()
            state, step_metrics = self.step_fn(state, batch)
            step += 1
            data_state = loader.state()  # after this step's batch: where a resume continues
            batch = next(loader) if step < run.steps else None  # read while the device works
            values = host_metrics(step_metrics)
            finite = values.pop("finite") == 1.0
            values = self._step_values(step, state, values, time.perf_counter() - t0)
            if not finite and run.on_nonfinite == "skip":
                values["skipped"] = 1.0
            metrics.write(step, values)  # a failing step's record too, for the post-mortem
            if not finite:
                self._nonfinite(step, values, last_saved, checkpointer.directory)
            if step % run.log_every == 0 or step == run.steps:
                self._say(progress_line(step, run.steps, values))
            if step % run.save_every == 0 or step == run.steps:
                save(step, data_state)
            stop = guard.agreed()
            if pause_at_step == step and not stop:
                checkpointer.wait()
                self.log(f"PAUSED at step {step}")
                while not stop:
                    time.sleep(0.05)
                    stop = guard.agreed()
        if stop:
            self.log(f"stop requested{f' (signal {guard.signal})' if guard.signal else ''}: saving step {step} and "
                     f"exiting")
            save(step, data_state)
        return state, step
