"""Fork-token bandit (docs/rl.md): one softmax over 10 actions, the rewarded action at probability 0.1.

Per rollout batch, N actions are sampled from pi_old and mu = 8 off-policy minibatch SGD steps follow. Once the
rewarded (positively advantaged) action's ratio r passes 1 + eps_high, PPO/DAPO give its samples zero gradient, so its
probability only creeps up through the pushed-down negatives; CISPO keeps the full sg(min(r, 5)) A gradient.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl.advantages import group_advantages
from m1jax.rl.losses import policy_loss

V, STAR, N, MU, LR = 10, 0, 512, 8, 0.5


@functools.lru_cache(maxsize=None)
def _sgd_step(name):
    @jax.jit
    def step(z, actions, old_logp, adv):
        def loss(z):
            logp = jax.nn.log_softmax(z)[actions][:, None]  # each action is a one-token sample: [n, 1]
            return policy_loss(name, logp, old_logp[:, None], adv, jnp.ones_like(logp))[0]
        return z - LR * jax.grad(loss)(z)
    return step


def _ratio_trajectories(name, batches, seed=0):
    """Per rollout batch: pi_old(a*) and [mu] ratios pi(a*) / pi_old(a*) after each minibatch step."""
    rng = np.random.default_rng(seed)
    z = jnp.zeros(V)
    out = []
    for _ in range(batches):
        p_old = np.asarray(jax.nn.softmax(z), np.float64)
        actions = rng.choice(V, size=N, p=p_old / p_old.sum())
        adv = group_advantages((actions == STAR).astype(np.float32), N)
        old_logp = jnp.log(jnp.asarray(p_old, jnp.float32))[actions]
        ratios = []
        for m in range(MU):
            part = slice(m * N // MU, (m + 1) * N // MU)
            z = _sgd_step(name)(z, jnp.asarray(actions[part]), old_logp[part], adv[part])
            ratios.append(float(jax.nn.softmax(z)[STAR]) / p_old[STAR])
        out.append((p_old[STAR], np.array(ratios)))
    return out


def test_first_minibatch_is_identical_across_losses():
    """At theta = theta_old (r = 1) CISPO, PPO and DAPO have the same gradient: mu = 1 cannot separate them."""
    first = [_ratio_trajectories(name, 1)[0][1][0] for name in ("cispo", "ppo", "dapo")]
    np.testing.assert_allclose(first, first[0], rtol=1e-6)
    assert first[0] > 1.0


@pytest.mark.parametrize("name,eps_high", [("ppo", 0.2), ("dapo", 0.28)])
def test_ppo_stalls_past_one_plus_eps_and_cispo_does_not(name, eps_high):
    (p_old, clipped), = _ratio_trajectories(name, 1)
    (_, cispo), = _ratio_trajectories("cispo", 1)
    assert p_old == pytest.approx(0.1)
    # The step at which the rewarded action's ratio first exceeds 1 + eps_high (same for both: same data, r = 1 start).
    k = int(np.argmax(clipped > 1 + eps_high))
    assert clipped[k] > 1 + eps_high and k < MU - 3
    steps = MU - 1 - k
    clipped_rate = np.log(clipped[-1] / clipped[k]) / steps
    cispo_rate = np.log(cispo[-1] / cispo[k]) / steps
    assert clipped_rate < 0.05, clipped      # only the indirect push through the negative samples is left
    assert cispo_rate > 5 * clipped_rate, (cispo, clipped)
    assert clipped[-1] < 1 + eps_high + 0.4 < 3.0 < cispo[-1]


def test_cispo_learns_the_rare_action_faster_over_rollout_batches():
    p_ppo = [p for p, _ in _ratio_trajectories("ppo", 3)]
    p_cispo = [p for p, _ in _ratio_trajectories("cispo", 3)]
    assert p_cispo[2] > 2 * p_ppo[2], (p_cispo, p_ppo)
