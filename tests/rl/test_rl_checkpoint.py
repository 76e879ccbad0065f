"""Checkpoints of RL runs: the starting policy (m1jax/rl/policy.py), the learner's state (save_state/restore_state,
and a stop request mid-run), and resuming a run directory (m1jax/rl/experiment.py)."""
import json

import jax
import numpy as np
import pytest

from m1jax.checkpoint import Checkpointer
from m1jax.config import ConfigError, ModelConfig
from m1jax.config.files import read_config
from m1jax.metrics import read_metrics
from m1jax.model import init_model
from m1jax.rl.experiment import run_experiment
from m1jax.rl.learner import restore_state
from m1jax.rl.policy import load_policy, save_policy
from m1jax.rl.pretrain import SFTConfig
from m1jax.train import split_model
from tests.rl import toy

TIMINGS = ("rollout_s", "score_s", "update_s", "eval_s")


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_records_close(got, want):
    """Same steps and keys; every number (lists included) equal to rounding, timings aside."""
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for g, w in zip(got, want):
        for k in w:
            if k not in TIMINGS:
                np.testing.assert_allclose(np.asarray(g[k], np.float64), np.asarray(w[k], np.float64), rtol=1e-5,
                                           atol=1e-6, err_msg=f"step {w['step']} {k}")


def test_second_policy_save_replaces_the_first(tmp_path):
    cfg = ModelConfig.tiny(num_hidden_layers=2, layer_types=("lightning", "softmax"))
    _, first = split_model(init_model(cfg, seed=0))
    _, second = split_model(init_model(cfg, seed=1))
    directory = str(tmp_path / "pretrained")
    save_policy(directory, cfg, first)
    save_policy(directory, cfg, second)  # orbax alone refuses: step 0 already exists
    loaded_cfg, _, params = load_policy(directory)
    assert loaded_cfg == cfg
    for got, want in zip(_leaves(params), _leaves(second)):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(second), _leaves(first)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrained"]  # no .writing / .old left behind
    # Execution settings may change on load (they change no parameter).
    assert load_policy(directory, compute_dtype="bfloat16")[0].compute_dtype == "bfloat16"


def test_stopped_and_restored_run_equals_a_straight_run(tmp_path):
    learner, params = toy.learner(steps=4)
    straight, records = learner.run(learner.init_state(params), log=lambda m: None)

    polls = []

    def stop_at_step_2():  # polled once before each step: the third poll is at step 2
        polls.append(1)
        return len(polls) == 3

    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    stopped, first_part = learner.run(learner.init_state(params), checkpointer=checkpointer,
                                      stop_requested=stop_at_step_2, log=lambda m: None)
    assert stopped.step == 2 and [r["step"] for r in first_part] == [0, 1] and checkpointer.all_steps() == [2]

    fresh, _ = toy.learner(steps=4)
    state = restore_state(checkpointer, fresh.init_state(params))
    assert state.step == 2
    for got, want in zip(_leaves(state.arrays()), _leaves(stopped.arrays())):
        np.testing.assert_array_equal(got, want)
    resumed, second_part = fresh.run(state, checkpointer=checkpointer, log=lambda m: None)
    checkpointer.close()
    assert resumed.step == 4 and checkpointer.all_steps() == [2, 4]
    # Problems and sampling keys depend on (seed, step) only: the pieces are the straight run, to rounding.
    _assert_records_close(first_part + second_part, records)
    for got, want in zip(_leaves(resumed.params), _leaves(straight.params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_run_directory_resumes_and_extends(tmp_path):
    learner, params = toy.learner()
    policy = save_policy(str(tmp_path / "policy"), toy.model_config(), params)
    workdir = str(tmp_path / "run")
    kwargs = dict(model=toy.model_config(), sft=SFTConfig(), rollout=learner.rollout_config,
                  update=learner.arms[0], init_checkpoint=policy, log=lambda m: None)
    run_experiment(workdir, toy.ParityTask(), rl=learner.config.replace(steps=2, eval_every=2), **kwargs)
    stored = read_config(workdir)
    assert stored["rl"]["steps"] == 2 and stored["update"]["loss"] == "cispo"
    assert stored["model"]["architecture"]["vocab_size"] == toy.ParityTask.vocab_size
    with pytest.raises(ConfigError, match="update.loss"):
        run_experiment(workdir, toy.ParityTask(), rl=learner.config.replace(steps=4, eval_every=2), resume=True,
                       **dict(kwargs, update=learner.arms[0].with_loss("dapo")))
    records = run_experiment(workdir, toy.ParityTask(), rl=learner.config.replace(steps=4, eval_every=2),
                             resume=True, **kwargs)
    assert [r["step"] for r in records] == [2, 3, 4]
    # The resumed run continues from its checkpoint, not from the starting policy: its records are a straight
    # 4-step run's (problems and keys depend on (seed, step) only), evaluation at step 2 included.
    straight = run_experiment(str(tmp_path / "straight"), toy.ParityTask(),
                              rl=learner.config.replace(steps=4, eval_every=2), **kwargs)
    _assert_records_close(records, straight[2:])
    written = read_metrics(workdir)
    assert [r["step"] for r in written] == [0, 1, 2, 3, 4] and len({r["run"] for r in written}) == 1
    assert [r["step"] for r in written if "acc" in r] == [0, 2, 4]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [2, 4]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rl"]["steps"] == 4
    # A fresh run in the same directory is refused before any work (it would delete the checkpoints) ...
    with pytest.raises(ConfigError, match=r"already holds RL checkpoints \(latest step 4\): resume the run"):
        run_experiment(workdir, toy.ParityTask(), rl=learner.config.replace(steps=1, eval_every=1), **kwargs)
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [2, 4]
    # ... unless told to start over.
    fresh = run_experiment(workdir, toy.ParityTask(), rl=learner.config.replace(steps=1, eval_every=1),
                           overwrite=True, **kwargs)
    assert [r["step"] for r in fresh] == [0, 1] and [r["step"] for r in read_metrics(workdir)] == [0, 1]
