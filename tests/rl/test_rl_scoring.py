"""Scoring a rollout (m1jax/rl/scoring.py through ``Learner.score``) against a hand-built rollout.

Five groups of G = 4 rows whose first response token sets each row's reward (3 -> 0, 4 -> 0.5, 5 -> 1):

    group 0: 0 0 0 0          all equal
    group 1: 1 0 1 0          mixed
    group 2: 1 1 1 1          all equal
    group 3: 0 .5 1 .5        mixed
    group 4: 1 0 0 0          mixed

The update batch has P = 4 groups and mu = 2 minibatches (slots 0-1 and 2-3). Advantages (GRPO: mean and unbiased std
of the group, by hand): group 1 (1 - .5) / sqrt(1/3) = +-0.8660; group 3 [-.5, 0, .5, 0] / sqrt(1/6) = [-1.2247, 0,
1.2247, 0]; group 4 [.75, -.25, -.25, -.25] / .5 = [1.5, -.5, -.5, -.5]; an all-equal group 0.
"""
import numpy as np
import pytest

from m1jax import generate
from m1jax.rl.learner import Learner, RLConfig
from m1jax.rl.rollout import Rollout, RolloutConfig
from m1jax.rl.step import UpdateConfig
from m1jax.rl.task import Task
from sharding.mesh import make_mesh

G, N, PROMPT = 4, 3, 2
REWARD_OF_TOKEN = {3: 0.0, 4: 0.5, 5: 1.0}
GROUP_REWARDS = [[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1], [0, .5, 1, .5], [1, 0, 0, 0]]
S3, S6 = np.sqrt(1 / 3), np.sqrt(1 / 6)
ADVANTAGE = {0: [0, 0, 0, 0], 1: [.5 / S3, -.5 / S3, .5 / S3, -.5 / S3], 2: [0, 0, 0, 0],
             3: [-.5 / S6, 0, .5 / S6, 0], 4: [1.5, -.5, -.5, -.5]}


class FirstTokenTask(Task):
    """Reward: a function of the first response token only (problems are the group indices)."""
    pad_id, stop_ids, max_prompt_tokens, max_new_tokens = 0, (1,), PROMPT, N

    def sample(self, rng, n):
        return list(range(n))

    def prompt(self, problem):
        return [2, 6 + problem]

    def reward(self, problem, completion):
        return REWARD_OF_TOKEN[int(completion[0])]


def _rollout():
    """20 rows: group g's prompt is [2, 6 + g]; row lengths 1..3 and stop reasons vary; sampler log-probs random."""
    rng = np.random.default_rng(0)
    first = np.array([{0.0: 3, 0.5: 4, 1.0: 5}[r] for group in GROUP_REWARDS for r in group], np.int32)
    lengths = rng.integers(1, N + 1, size=first.size).astype(np.int32)
    responses = np.zeros((first.size, N), np.int32)
    for i, (t, n) in enumerate(zip(first, lengths)):
        responses[i, :n] = [t] + [7] * (n - 1)
    prompts = np.array([[2, 6 + i // G] for i in range(first.size)], np.int32)
    start = np.array([i % 2 for i in range(first.size)], np.int32)  # any values: start is carried along
    logp = np.where(np.arange(N)[None] < lengths[:, None], -rng.uniform(0.1, 2, (first.size, N)), 0).astype(
        np.float32)
    reasons = np.where(np.arange(first.size) % 5 == 0, generate.TRUNCATED, generate.STOP_TOKEN).astype(np.int32)
    host = dict(prompt_tokens=prompts, start=start, responses=responses, sampler_logp=logp,
                max_probs=np.exp(logp), lengths=lengths, stop_reason=reasons)
    return host


def _score(host, mesh, dynamic_sampling, adv_norm="group_std", prompts=4):
    learner = Learner(None, FirstTokenTask(), mesh=mesh,  # score never touches the model
                      config=RLConfig(prompts=prompts, oversample=2, dynamic_sampling=dynamic_sampling,
                                      adv_norm=adv_norm),
                      update=UpdateConfig(mu=2), rollout=RolloutConfig(group_size=G))
    rollout = Rollout(**{k: learner.place.rows(v) for k, v in host.items()})
    batch, stats = learner.score(rollout, list(range(len(GROUP_REWARDS))))
    return {k: np.asarray(v) for k, v in batch.items()}, stats


def _expected_rows(host, slots):
    """The update batch's rows when the slots take the rollout groups ``slots`` (None: padding, group 0)."""
    rows = np.concatenate([np.arange(G) + G * (0 if g is None else g) for g in slots])
    weight = np.repeat([0.0 if g is None else 1.0 for g in slots], G)
    advantages = np.concatenate([np.zeros(G) if g is None else ADVANTAGE[g] for g in slots])
    tokens = np.concatenate([host["prompt_tokens"], host["responses"]], 1)[rows]
    mask = (np.arange(N)[None] < host["lengths"][rows, None]) * weight[:, None]
    return rows, weight, advantages, tokens, mask


@pytest.mark.parametrize("mesh_spec", [None, "data=4,expert=2"])
def test_dynamic_sampling_keeps_the_mixed_groups_round_robin(mesh_spec):
    host = _rollout()
    batch, stats = _score(host, make_mesh(mesh_spec) if mesh_spec else None, dynamic_sampling=True)
    # Mixed groups 1, 3, 4 in order, dealt round-robin over the two minibatches (slots 0, 2, 1), slot 3 padding: each
    # minibatch gets real groups.
    rows, weight, advantages, tokens, mask = _expected_rows(host, [1, 4, 3, None])
    np.testing.assert_array_equal(batch["tokens"], tokens)
    np.testing.assert_array_equal(batch["start"], host["start"][rows])
    np.testing.assert_array_equal(batch["mask"], mask)
    np.testing.assert_array_equal(batch["sampler_logp"], host["sampler_logp"][rows])
    np.testing.assert_allclose(batch["advantages"], advantages, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch["group_ids"], np.repeat(np.arange(4), G))
    assert batch["mask"][3 * G:].sum() == 0 and batch["advantages"][3 * G:].tolist() == [0.0] * G  # padding
    assert batch["mask"][:2 * G].sum() > 0 and batch["mask"][2 * G:].sum() > 0
    all_rewards = np.concatenate(GROUP_REWARDS)
    assert stats["reward_mean"] == pytest.approx(all_rewards.mean())
    assert (stats["mixed_frac"], stats["kept_groups"]) == (pytest.approx(3 / 5), 3.0)
    assert stats["mean_length"] == pytest.approx(host["lengths"].mean())
    assert stats["rollout_tokens"] == host["lengths"].sum()
    assert stats["truncated_frac"] == pytest.approx(np.mean(host["stop_reason"] == generate.TRUNCATED))


def test_without_dynamic_sampling_the_first_groups_are_kept_whole():
    host = _rollout()
    batch, stats = _score(host, None, dynamic_sampling=False)
    rows, weight, advantages, tokens, mask = _expected_rows(host, [0, 1, 2, 3])
    np.testing.assert_array_equal(batch["tokens"], tokens)
    np.testing.assert_array_equal(batch["mask"], mask)  # zero-variance groups keep their tokens (advantage 0)
    np.testing.assert_allclose(batch["advantages"], advantages, rtol=1e-5, atol=1e-6)
    assert stats["kept_groups"] == 4.0


def test_batch_std_is_over_the_kept_groups_only():
    host = _rollout()
    batch, _ = _score(host, None, dynamic_sampling=True, adv_norm="batch_std")
    kept = np.array([GROUP_REWARDS[g] for g in (1, 4, 3)], np.float64)  # slots 0..2; slot 3 is padding
    std = np.sqrt(np.sum((kept - kept.mean()) ** 2) / (kept.size - 1))
    want = np.concatenate([(kept - kept.mean(axis=1, keepdims=True)).reshape(-1) / (std + 1e-6), np.zeros(G)])
    np.testing.assert_allclose(batch["advantages"], want, rtol=1e-5, atol=1e-6)



def test_select_groups_defaults_and_refusals():
    """Without options: the first P groups whole, no dynamic sampling, one block (a default call equals the explicit
    one); exactly P groups is enough; rewards that are not P or more whole groups of G are refused."""
    from m1jax.rl.scoring import select_groups
    rewards = np.array([1, 1, 0, 1, 0, 0, 1, 0], np.float32)  # 4 groups of 2: constant, mixed, constant, mixed
    default, _ = select_groups(rewards, group_size=2, num_groups=3)
    np.testing.assert_array_equal(default.rows, np.arange(6))
    np.testing.assert_array_equal(default.weight, np.ones(6))
    sampled, _ = select_groups(rewards, group_size=2, num_groups=3, dynamic_sampling=True)
    explicit, _ = select_groups(rewards, group_size=2, num_groups=3, dynamic_sampling=True, minibatches=1)
    np.testing.assert_array_equal(sampled.rows, explicit.rows)
    np.testing.assert_array_equal(sampled.rows, [2, 3, 6, 7, 0, 1])  # groups 1 and 3, then padding (group 0)
    np.testing.assert_array_equal(sampled.weight, [1, 1, 1, 1, 0, 0])
    select_groups(rewards, group_size=2, num_groups=4)  # exactly P groups
    for bad, p in ((rewards, 5), (rewards[:7], 3), (rewards.reshape(4, 2), 3)):
        with pytest.raises(ValueError, match="expected rewards of >= "):
            select_groups(bad, group_size=2, num_groups=p)


def test_decision_points_are_kept_on_response_tokens_only():
    """A task's decision mask may mark positions past a row's end (padding): the update batch keeps the mask's own
    values on the row's response tokens and zeros elsewhere, whatever the row's weight."""
    from m1jax.rl.scoring import gather_update_batch, select_groups
    host = _rollout()
    rollout = Rollout(**{k: np.asarray(v) for k, v in host.items()})
    selection, _ = select_groups(np.concatenate(GROUP_REWARDS), group_size=G, num_groups=4, dynamic_sampling=True)
    decision = (np.random.default_rng(1).random(host["responses"].shape) < 0.6).astype(np.float32)  # also past ends
    batch = gather_update_batch(rollout, selection, decision=decision)
    on_response = np.arange(N)[None] < host["lengths"][selection.rows, None]
    np.testing.assert_array_equal(np.asarray(batch["decision"]), decision[selection.rows] * on_response)
