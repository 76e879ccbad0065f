"""Policy-loss behaviour that the closed-form tests of test_rl_losses.py leave open, found by mutation testing
(scripts/mutate.py m1jax/rl/losses.py): the default trust regions at their lower edge, the dual clip with |A| != 1 and
with small positive A, no gradient into old_logp, metrics over active tokens only, non-finite values at masked
positions, and the default Dr. GRPO normaliser on a non-square batch. Each expectation is written from the definition.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl.losses import LOSSES, aggregate, default_knobs, policy_loss

# Published trust regions: PPO / GRPO / Dr. GRPO eps 0.2 both ways; DAPO's clip-higher 0.2 / 0.28 (also the mask of
# CISPO's masked form). CISPO caps its IS weight at 5; aggregation defaults as the module docstring states.
DEFAULTS = {
    "cispo": dict(agg="batch_token_mean", ratio_max=5.0),
    "cispo_masked": dict(agg="batch_token_mean", ratio_max=5.0, eps_low=0.2, eps_high=0.28),
    "ppo": dict(agg="sample_mean", eps_low=0.2, eps_high=0.2),
    "grpo": dict(agg="sample_mean", eps_low=0.2, eps_high=0.2),
    "dapo": dict(agg="batch_token_mean", eps_low=0.2, eps_high=0.28),
    "drgrpo": dict(agg="const_norm", eps_low=0.2, eps_high=0.2),
}


def test_default_knobs():
    assert {name: default_knobs(name) for name in LOSSES} == DEFAULTS
    with pytest.raises(ValueError, match="unknown policy loss"):
        default_knobs("reinforce")


def _row(advantages, ratios):
    """One row: logp = 0, old_logp = -log r, so the ratio of token t is ratios[t]."""
    r = np.asarray(ratios, np.float64)
    return (jnp.zeros((1, len(r)), jnp.float32), jnp.asarray(-np.log(r)[None], jnp.float32),
            jnp.asarray(np.asarray(advantages, np.float32)[None]), jnp.ones((1, len(r)), jnp.float32))


@pytest.mark.parametrize("name", ["cispo_masked", "ppo", "grpo", "dapo", "drgrpo"])
def test_default_trust_region_edges(name):
    """With default knobs a token is outside PPO's region when A < 0 and r < 1 - 0.2, or A > 0 and r > 1 + eps_high;
    ratios just inside and just outside each edge (0.75 | 0.85; 1.15 | 1.25 for 0.2, 1.25 | 1.3 for 0.28)."""
    high = DEFAULTS[name]["eps_high"]
    ratios = [0.75, 0.85, 1.15 if high == 0.2 else 1.25, 1.25 if high == 0.2 else 1.3]
    outside = [True, False, False, True]
    _, m = policy_loss(name, *_row([-1.0, -1.0, 1.0, 1.0], ratios))
    np.testing.assert_allclose(m["ppo_clip_frac"], np.mean(outside), rtol=1e-6)


def _coefficients(name, advantages, ratios, **knobs):
    """d loss / d logp_t times the number of tokens (batch_token_mean / sample_mean of one row both divide by T):
    minus the coefficient c_t of the surrogate sum_t c_t logp_t."""
    logp, old, adv, mask = _row(advantages, ratios)
    g = jax.grad(lambda lp: policy_loss(name, lp, old, adv, mask, **knobs)[0])(logp)
    return -np.asarray(g)[0] * len(ratios)


def test_dual_clip_bounds_negative_advantages_at_c_times_a():
    """PPO with dual clip c = 3: for A < 0 the surrogate is max(min(rA, clip(r)A), cA), so tokens with r > c (for
    r above the trust region min(...) = rA) are frozen at cA (coefficient 0) and the rest keep r A (coefficient r).
    |A| != 1 separates c * A from c / A and A / c; A = +0.5 inside the region checks that A > 0 is never floored."""
    adv = [-2.0, -2.0, -0.5, -0.5, 0.5]
    ratios = [2.5, 3.5, 2.9, 3.2, 1.1]
    want = [2.5, 0.0, 2.9, 0.0, 1.1]
    np.testing.assert_allclose(_coefficients("ppo", adv, ratios, dual_clip=3.0) / np.asarray(adv), want, rtol=1e-5)
    _, m = policy_loss("ppo", *_row(adv, ratios), dual_clip=3.0)
    np.testing.assert_allclose(m["dual_clip_frac"], 2 / 5, rtol=1e-6)
    value, _ = policy_loss("ppo", *_row(adv, ratios), dual_clip=3.0)
    surrogate = [2.5 * -2.0, 3.0 * -2.0, 2.9 * -0.5, 3.0 * -0.5, 1.1 * 0.5]  # floored at c A where frozen
    np.testing.assert_allclose(float(value), -np.mean(surrogate), rtol=1e-6)


@pytest.mark.parametrize("name", LOSSES)
def test_no_gradient_into_old_logp(name):
    """old_logp is data (the sampler's log-probs): the loss has zero gradient with respect to it."""
    logp, old, adv, mask = _row([1.0, -0.5, 2.0], [0.9, 1.1, 1.3])
    g = jax.grad(lambda o: policy_loss(name, logp, o, adv, mask)[0])(old)
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_ratio_metrics_ignore_padded_tokens():
    """Padded tokens have ratio 1 after filling; with every active ratio above 1 (below 1), ratio_min (ratio_max)
    must still be the smallest (largest) active one."""
    for ratios in ([1.5, 2.0, 9.0], [0.5, 0.25, 9.0]):
        logp, old, adv, _ = _row([1.0, 1.0, 1.0], ratios)
        mask = jnp.asarray([[1.0, 1.0, 0.0]])
        _, m = policy_loss("cispo", logp, old, adv, mask)
        np.testing.assert_allclose([m["ratio_min"], m["ratio_max"]], [min(ratios[:2]), max(ratios[:2])], rtol=1e-6)


@pytest.mark.parametrize("agg", ["batch_token_mean", "sample_mean", "const_norm"])
def test_aggregate_ignores_non_finite_masked_values(agg):
    values = jnp.asarray([[1.0, 2.0, jnp.nan], [3.0, -jnp.inf, jnp.inf]])
    mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    clean = jnp.where(mask > 0, values, 0.0)
    np.testing.assert_allclose(float(aggregate(values, mask, agg)), float(aggregate(clean, mask, agg)), rtol=1e-6)
    assert np.isfinite(float(aggregate(values, mask, agg)))


def test_const_norm_default_is_batch_times_length():
    """Dr. GRPO's default constant is B * T (#sequences x max_new_tokens), checked on a non-square [2, 5] batch."""
    values = jnp.arange(10.0).reshape(2, 5)
    np.testing.assert_allclose(float(aggregate(values, jnp.ones((2, 5)), "const_norm")), 45.0 / 10, rtol=1e-6)


def test_no_gradient_into_advantages_or_reference():
    """Advantages and the reference policy's log-probs are data as well."""
    logp, old, adv, mask = _row([1.0, -0.5, 2.0], [0.9, 1.1, 1.3])
    ref = jnp.asarray([[-0.3, 0.2, 0.1]])
    g_adv = jax.grad(lambda a: policy_loss("ppo", logp, old, a, mask)[0])(adv)
    g_ref = jax.grad(lambda r: policy_loss("grpo", logp, old, adv, mask, kl_beta=0.1, ref_logp=r)[0])(ref)
    np.testing.assert_array_equal(np.asarray(g_adv), 0.0)
    np.testing.assert_array_equal(np.asarray(g_ref), 0.0)


def test_group_token_mean_with_unequal_groups():
    """Three groups of 1, 2 and 3 rows (labels in no order): the mean over groups of each group's token mean."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 4)).astype(np.float32)
    mask = (rng.random((6, 4)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0  # no empty group
    ids = np.array([9, 4, 4, 1, 1, 1])
    want = np.mean([np.sum((values * mask)[ids == g]) / np.sum(mask[ids == g]) for g in (9, 4, 1)])
    got = aggregate(jnp.asarray(values), jnp.asarray(mask), "group_token_mean", group_ids=jnp.asarray(ids))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


@pytest.mark.parametrize("agg", ["batch_token_mean", "sample_mean", "group_token_mean"])
def test_fractional_and_empty_mask_weights(agg):
    """Float mask weights summing below 1 still divide by their sum; an all-zero mask gives 0, not NaN."""
    values = jnp.asarray([[2.0, 4.0], [6.0, 8.0]])
    weights = jnp.asarray([[0.25, 0.25], [0.5, 0.0]])
    kw = {"group_ids": jnp.asarray([0, 0])} if agg == "group_token_mean" else {}
    want = {"batch_token_mean": (0.5 + 1.0 + 3.0) / 1.0, "sample_mean": (1.5 / 0.5 + 3.0 / 0.5) / 2,
            "group_token_mean": 4.5 / 1.0}[agg]
    np.testing.assert_allclose(float(aggregate(values, weights, agg, **kw)), want, rtol=1e-6)
    assert float(aggregate(values, jnp.zeros((2, 2)), agg, **kw)) == 0.0


def test_ratio_min_zero_means_none_and_one_is_a_bound():
    adv, ratios = [1.0, 1.0, -1.0], [0.5, 2.0, 0.25]
    plain = _coefficients("cispo", adv, ratios)
    np.testing.assert_allclose(_coefficients("cispo", adv, ratios, ratio_min=0.0), plain, rtol=1e-6)
    np.testing.assert_allclose(_coefficients("cispo", adv, ratios, ratio_min=1.0), [1.0, 2.0, -1.0], rtol=1e-6)


# (loss, knobs, accepted): each validation bound probed on both sides (the error cases at the bound itself)
BOUNDS = [
    ("cispo", dict(eps_is_high=0.0), False), ("cispo", dict(eps_is_high=0.1), True),
    ("cispo", dict(ratio_max=0.0), False), ("cispo", dict(ratio_max=0.5), True),
    ("cispo", dict(ratio_min=2.0, ratio_max=2.0), False), ("cispo", dict(ratio_min=1.5, ratio_max=2.0), True),
    ("dapo", dict(eps_low=0.0), True), ("dapo", dict(eps_high=0.0), True),
    ("ppo", dict(dual_clip=1.0), False), ("ppo", dict(dual_clip=1.5), True),
    ("drgrpo", dict(norm_constant=0.0), False), ("drgrpo", dict(norm_constant=-3.0), False),
    ("drgrpo", dict(norm_constant=float("inf")), False), ("drgrpo", dict(norm_constant=0.5), True),
    ("cispo", dict(agg="group_token_mean", group_size=0), False),
    ("cispo", dict(agg="group_token_mean", group_size=1), True),
]


@pytest.mark.parametrize("name,knobs,accepted", BOUNDS)
def test_validation_bounds(name, knobs, accepted):
    args = _row([1.0, -1.0], [0.9, 1.1])
    if accepted:
        loss, _ = policy_loss(name, *args, **knobs)
        assert np.isfinite(float(loss))
    else:
        with pytest.raises(ValueError):
            policy_loss(name, *args, **knobs)
