"""The learner (m1jax/rl/learner.py) on a task that is not arithmetic, and across processes.

* A toy parity task (tests/rl/toy.py: a few lines implementing m1jax.rl.task.Task) trains through ``Learner.run``:
  the learner knows nothing of arithmetic, and its evaluation reports the task's own subsets.
* Two processes joined through jax.distributed (4 fake CPU devices each) run one RL step (rollout + score + update)
  on a data=4,expert=2 mesh over all 8 devices and get the same record and updated params as one process with 8
  devices on the same mesh.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.model import init_model
from m1jax.train import split_model
from sharding.mesh import make_mesh
from tests.rl import rl_worker, toy

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
MESH = "data=4,expert=2"


def test_learner_trains_a_toy_task():
    learner, params = toy.learner(steps=12)
    state, records = learner.run(learner.init_state(params), log=lambda m: None)
    assert state.step == 12 and [r["step"] for r in records] == list(range(13))
    first, last = records[0], records[-1]
    # The evaluation reports the task's own subset (odd prompts), and the held-out accuracy rises from chance.
    assert {"acc", "greedy_acc", "acc_odd", "greedy_acc_odd"} <= set(first) and "acc" in last
    assert 0.2 < first["acc"] < 0.8, first
    assert last["acc"] > first["acc"] + 0.2, (first, last)
    rewards = [r["reward_mean"] for r in records[:-1]]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.15, rewards


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "result.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.rl.rl_worker", str(out), MESH], cwd=ROOT,
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the two-process RL step did not finish in {TIMEOUT_S}s")
    if any(p.returncode for p in procs):
        pytest.fail("worker failed:\n" + "\n".join(log[-4000:] for log in logs))

    result = np.load(out)
    assert int(result["processes"]) == 2 and int(result["devices"]) == 8
    record, params = rl_worker.run_one_step(make_mesh(MESH))  # one process, 8 devices, the same mesh
    want = rl_worker.numbers(record)
    got = {k[2:]: result[k] for k in result.files if k.startswith("r_")}
    assert sorted(got) == sorted(want)
    # The rollout drew the same samples: identical rewards and selection; the update agrees to rounding.
    for k in ("reward_mean", "mixed_frac", "kept_groups", "rollout_tokens", "update_tokens", "mean_length"):
        assert float(got[k]) == want[k], k
    assert 0 < want["mixed_frac"] < 1 and want["kept_groups"] > 0, want  # a step that moves the params
    for k, v in want.items():
        np.testing.assert_allclose(got[k], np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)
    leaves = jax.tree_util.tree_leaves(params)
    assert len([k for k in result.files if k.startswith("param_")]) == len(leaves)
    for i, leaf in enumerate(leaves):
        np.testing.assert_allclose(result[f"param_{i}"], np.asarray(leaf), rtol=1e-5, atol=1e-6, err_msg=str(i))


def test_evaluation_numbers_against_the_model_itself():
    """``Learner.evaluate``'s accuracies from independent computations on the parity task, whose reward reads only
    the first response token: the greedy answer to a problem is the argmax of the uncached forward after its
    prompt, so ``greedy_acc`` (and ``greedy_acc_odd``) are means of those exact 0/1 values; ``acc`` (temperature 1)
    is the same key's rollout scored by the task, and lies within sampling error of the exact expectation, the
    softmax mass on tokens of the right parity."""
    learner, _ = toy.learner()
    # Weights whose greedy answer is right on even problems and wrong on odd ones (so greedy_acc, greedy_acc_odd
    # and the all-problems mean differ), with no near-tie at either prompt.
    _, params = split_model(init_model(toy.model_config(), seed=6))
    problems = np.asarray(learner.held_out)
    assert 0 < problems.sum() < len(problems)  # both subsets non-empty
    placed = learner.init_state(params).params
    out = learner.evaluate(placed, jax.random.PRNGKey(5))

    model = nnx.merge(learner.graphdef, params)
    logits = np.asarray(model(jnp.asarray([[toy.BOS, 3], [toy.BOS, 4]], jnp.int32)).logits[:, -1], np.float64)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-2)  # no near-tie for the greedy pass to break differently
    greedy_right = (np.argmax(logits, -1) % 2 == np.arange(2)).astype(float)[problems]
    assert greedy_right[problems == 0].all() and not greedy_right[problems == 1].any()
    assert out["greedy_acc"] == pytest.approx(greedy_right.mean())
    assert out["greedy_acc_odd"] == pytest.approx(greedy_right[problems == 1].mean())

    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.array([probs[p, p::2].sum() for p in (0, 1)])[problems]  # tokens of parity p
    samples = learner.config.eval_samples
    assert abs(out["acc"] - expected.mean()) < 4 * 0.5 / np.sqrt(len(problems) * samples)
    rollout = learner.rollout(placed, list(problems), jax.random.PRNGKey(5), group_size=samples, temperature=1.0)
    responses = np.asarray(rollout.responses)
    rewards = np.array([learner.task.reward(problems[r // samples], responses[r]) for r in range(len(responses))])
    per_problem = rewards.reshape(len(problems), samples).mean(1)
    assert out["acc"] == pytest.approx(per_problem.mean())
    assert out["acc_odd"] == pytest.approx(per_problem[problems == 1].mean())
