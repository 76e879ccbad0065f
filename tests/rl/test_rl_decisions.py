"""Decision points through the learner (m1jax/rl/learner.py, scoring.py, step.py): the task's decision masks reach
the update batch row for row, and the update's decision metrics equal closed forms on that batch.

At minibatch 0 the params are the sampler's, so r = 1 (fp32 on CPU: up to ~1e-6) and every loss gives each token
of row b the coefficient dL/dlogp = -A_b / N (token-mean losses): the decision points' share of sum |dL/dlogp| is
sum_b |A_b| #decisions_b / sum_b |A_b| #tokens_b, and nothing is clipped.
"""
import jax
import numpy as np
import pytest

from m1jax.rl.learner import Learner
from m1jax.rl.scoring import select_groups
from m1jax.rl.task import decision_masks
from tests.rl import toy


class ParityWithDecisions(toy.ParityTask):
    """The toy parity task, whose only decision is the first response token (it alone decides the reward)."""

    def decision_mask(self, problem, completion):
        out = np.zeros(len(completion), bool)
        out[0] = True
        return out


@pytest.mark.parametrize("loss", ["dapo", "cispo"])
def test_decision_points_reach_the_update_and_its_metrics(loss):
    base, params = toy.learner(loss=loss)
    assert not base.decisions  # the plain toy task marks none
    learner = Learner(base.graphdef, ParityWithDecisions(), config=base.config, update=base.arms[0],
                      rollout=base.rollout_config)
    assert learner.decisions
    cfg, g, mu = learner.config, learner.rollout_config.group_size, learner.arms[0].mu
    state = learner.init_state(params)
    problems = learner.problems(0)
    rollout = learner.rollout(state.params, problems, jax.random.key(5), group_size=g)
    responses = np.asarray(rollout.responses)
    want = decision_masks(learner.task, [problems[r // g] for r in range(len(responses))], responses)
    scored = learner.score_rows(rollout, problems, g, decisions=True)
    np.testing.assert_array_equal(scored["decision"], want)

    batch, _ = learner.score(rollout, problems)
    selection, _ = select_groups(scored["rewards"], group_size=g, num_groups=cfg.prompts, adv_norm=cfg.adv_norm,
                                 dynamic_sampling=cfg.dynamic_sampling, minibatches=mu)
    host = jax.device_get(batch)
    response_mask = np.asarray(rollout.response_mask)[selection.rows]
    np.testing.assert_array_equal(host["decision"], want[selection.rows] * response_mask)
    assert host["decision"].sum() > 0 and (host["mask"] > 0).sum() > host["decision"].sum()

    _, record = learner.update(state, batch)
    m, a = host["mask"], np.abs(host["advantages"])
    d = host["decision"] * (m > 0)
    blocks = np.split(np.arange(len(m)), mu)
    first = blocks[0]
    share0 = (a[first] * d[first].sum(1)).sum() / (a[first] * m[first].sum(1)).sum()
    assert record["grad_share_decision_by_minibatch"][0] == pytest.approx(share0, rel=1e-4)
    frac = np.mean([d[b].sum() / m[b].sum() if m[b].sum() else 0.0 for b in blocks])
    assert record["decision_frac"] == pytest.approx(frac, rel=1e-5)
    clip = "ppo_clip_frac_decision_by_minibatch" if loss == "dapo" else "is_cap_frac_decision_by_minibatch"
    assert record[clip][0] == 0.0
