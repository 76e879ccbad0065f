"""One RL run in a run directory: the starting policy, the learner, checkpoints, metrics and the accuracy plot.

``run_experiment(workdir, task, ...)`` is what ``python -m experiments.rl`` calls. The run directory holds

    config.json        every section of the run (model, sft, rollout, update, rl, task), m1jax.config.files format
    pretrained/        the starting policy (``m1jax.rl.policy``), unless it came from ``init_checkpoint``
    checkpoints/<s>/   the RL state (params, optimizer state) after s steps (``m1jax.rl.learner.save_state``)
    metrics.jsonl, tensorboard/, run.json   the step records (``m1jax.metrics.MetricsLogger``)
    accuracy.png       held-out accuracy against RL steps (with matplotlib)

``resume=True`` continues from the latest checkpoint (the stored config must agree on every setting a resumed run
has to keep); otherwise an earlier run's checkpoints and metrics in the directory are removed first. SIGTERM and
SIGINT save the state and end the run early; ``resume`` then continues it.
"""
from __future__ import annotations

import os
import shutil
import signal
from typing import Mapping

import jax

from m1jax.checkpoint import Checkpointer
from m1jax.train.preemption import PreemptionGuard
from m1jax.config import ConfigError, ModelConfig
from m1jax.config.files import read_config, resume_conflicts, write_config
from m1jax.metrics import JSONL, RUN_FILE, MetricsLogger, read_metrics
from m1jax.rl.learner import Learner, RLConfig, restore_state
from m1jax.rl.plots import plot_accuracy
from m1jax.rl.policy import load_policy, save_policy
from m1jax.rl.pretrain import SFTConfig, pretrain
from m1jax.rl.rollout import RolloutConfig
from m1jax.rl.step import UpdateConfig
from m1jax.rl.task import Task

PRETRAINED, CHECKPOINTS, PLOT = "pretrained", "checkpoints", "accuracy.png"


def run_experiment(workdir: str, task: Task, *, model: ModelConfig, sft: SFTConfig, rollout: RolloutConfig,
                   update: UpdateConfig, rl: RLConfig, mesh: jax.sharding.Mesh | None = None,
                   init_checkpoint: str | None = None, resume: bool = False, overwrite: bool = False,
                   task_section: Mapping | None = None, log=print) -> list[dict]:
    """Pretrain (or load) the policy, run RL with the learner, write everything under ``workdir`` (module
    docstring). ``model``'s architecture is used only when pretraining; a loaded policy keeps its own, with
    ``model``'s execution settings. ``task_section`` is written to config.json as the task's description.
    A fresh run (no ``resume``) in a directory that holds RL checkpoints is refused unless ``overwrite``: starting
    over deletes them. Returns the records of the RL steps run now."""
    workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    checkpoint_dir = os.path.join(workdir, CHECKPOINTS)
    checkpointer = Checkpointer(checkpoint_dir, max_to_keep=2)
    resuming = resume and checkpointer.latest_step() is not None
    if resuming:
        conflicts = resume_conflicts(read_config(workdir), {"rollout": rollout, "update": update,
                                                            "rl": rl.resolved(update.loss)})
        if conflicts:
            raise ConfigError("cannot resume with settings that differ from the stored run:\n  "
                              + "\n  ".join(conflicts))
    else:
        if checkpointer.latest_step() is not None and not overwrite:
            raise ConfigError(f"{checkpoint_dir} already holds RL checkpoints (latest step "
                              f"{checkpointer.latest_step()}): resume the run (--resume), start it over and delete "
                              f"them (--overwrite), or use a new work directory")
        _clear_run_outputs(workdir, checkpointer, primary, log)

    cfg, graphdef, params = starting_policy(workdir, task, model, sft, mesh=mesh, init_checkpoint=init_checkpoint,
                                           reuse_pretrained=resuming, log=log)
    learner = Learner(graphdef, task, config=rl, update=update, rollout=rollout, mesh=mesh)
    if primary:
        write_config(workdir, model=cfg, sft=sft, rollout=rollout, update=update, rl=learner.config,
                     **({"task": dict(task_section)} if task_section is not None else {}))
    state = learner.init_state(params)
    if resuming:
        state = restore_state(checkpointer, state)
        log(f"resumed from {checkpointer.step_path(state.step)} at RL step {state.step}")
    metrics = MetricsLogger(workdir, prefix=f"{update.loss}_mu{update.mu}_seed{rl.seed}",
                            resume_step=state.step - 1 if resuming else None, enabled=primary, log=log)
    with metrics, PreemptionGuard((signal.SIGTERM, signal.SIGINT)) as guard:
        state, records = learner.run(state, metrics=metrics, checkpointer=checkpointer,
                                     stop_requested=lambda: guard.requested, log=log)
    checkpointer.close()
    if primary:
        _report(workdir, metrics.run_name, update, state.step, log)
    return records


def starting_policy(workdir: str, task: Task, model: ModelConfig, sft: SFTConfig, *,
                    mesh: jax.sharding.Mesh | None = None, init_checkpoint: str | None = None,
                    reuse_pretrained: bool = False, log=print):
    """(cfg, graphdef, params) of the policy RL starts from: loaded from ``init_checkpoint`` (with ``model``'s
    execution settings), or from ``workdir/pretrained`` when ``reuse_pretrained`` and it exists, else pretrained now
    on the task (``m1jax.rl.pretrain``) and saved to ``workdir/pretrained``."""
    pretrained = os.path.join(os.path.abspath(workdir), PRETRAINED)
    source = init_checkpoint or (pretrained if reuse_pretrained and os.path.isdir(pretrained) else None)
    if source:
        cfg, graphdef, params = load_policy(source, mesh=mesh, **model.execution.to_dict())
        log(f"loaded the starting policy from {source}")
        return cfg, graphdef, params
    log(f"model: {model.num_hidden_layers} layers {model.layer_types}, hidden {model.hidden_size}, "
        f"{model.num_local_experts} experts; {model.param_counts()['total'] / 1e6:.2f}M params")
    graphdef, params = pretrain(model, task, sft, mesh=mesh, log=log)
    log(f"saved the pretrained policy to {save_policy(pretrained, model, params)}")
    return model, graphdef, params


def _clear_run_outputs(workdir: str, checkpointer: Checkpointer, primary: bool, log) -> None:
    """A fresh run: remove an earlier run's RL checkpoints and metrics (the pretrained policy is replaced later)."""
    old = checkpointer.all_steps()
    for step in old:
        checkpointer.manager.delete(step)
    if not primary:
        return
    for name in (JSONL, RUN_FILE):
        if os.path.exists(os.path.join(workdir, name)):
            os.remove(os.path.join(workdir, name))
    shutil.rmtree(os.path.join(workdir, "tensorboard"), ignore_errors=True)
    if old:
        log(f"fresh run: removed the earlier run's checkpoints (steps {old}) and metrics in {workdir} "
            f"(resume continues a run instead)")


def _report(workdir: str, run_name: str, update: UpdateConfig, final_step: int, log) -> None:
    """The accuracy change over the whole run (resumed parts included) and accuracy.png."""
    evals = [r for r in read_metrics(workdir) if r.get("run") == run_name and "acc" in r]
    if not evals:
        return
    first, last = evals[0], evals[-1]
    log(f"accuracy {first['acc']:.3f} -> {last['acc']:.3f} (greedy {first['greedy_acc']:.3f} -> "
        f"{last['greedy_acc']:.3f}) over {final_step} RL steps; metrics in {os.path.join(workdir, JSONL)}")
    path = os.path.join(workdir, PLOT)
    if plot_accuracy({f"{update.loss} mu={update.mu}": ([r["step"] for r in evals], [r["acc"] for r in evals])},
                     path, "RL held-out accuracy", log=log):
        log(f"wrote {path}")
