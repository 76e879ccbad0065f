"""Group advantages, dynamic sampling and DAPO overlong shaping against hand-computed values."""
import jax
import numpy as np
import pytest

from m1jax.rl.advantages import (group_advantages, mixed_group_mask, overlong_penalty,
                                 select_mixed_groups)

# Three groups of G = 4: mixed, all correct (zero variance), one correct.
REWARDS = np.array([[1.0, 0.0, 0.0, 1.0],
                    [1.0, 1.0, 1.0, 1.0],
                    [0.0, 0.0, 0.0, 1.0]], np.float32)
EPS = 1e-6


def test_group_std_by_hand():
    # Group 0: mean 1/2, unbiased std sqrt(4 * 1/4 / 3) = sqrt(1/3). Group 2: mean 1/4,
    # unbiased std sqrt((3 * 1/16 + 9/16) / 3) = 1/2.
    s0, s2 = np.sqrt(1 / 3), 0.5
    expected = np.array([[0.5 / (s0 + EPS), -0.5 / (s0 + EPS), -0.5 / (s0 + EPS), 0.5 / (s0 + EPS)],
                         [0.0, 0.0, 0.0, 0.0],
                         [-0.25 / (s2 + EPS), -0.25 / (s2 + EPS), -0.25 / (s2 + EPS), 0.75 / (s2 + EPS)]])
    np.testing.assert_allclose(group_advantages(REWARDS), expected, rtol=1e-6)
    # ddof=0 (population std): group 2's std is sqrt(3/16).
    np.testing.assert_allclose(group_advantages(REWARDS, ddof=0)[2, 3], 0.75 / (np.sqrt(3 / 16) + EPS), rtol=1e-6)


def test_zero_variance_groups_get_exactly_zero():
    rewards = np.array([[0.3, 0.3, 0.3], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], np.float32)
    for norm in ("group_std", "mean_only", "batch_std"):
        adv = np.asarray(group_advantages(rewards, norm=norm))
        assert np.all(adv[:2] == 0.0), norm
        assert np.all(adv[2] != 0.0), norm


def test_mean_only_batch_std_none_by_hand():
    centred = np.array([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.25, -0.25, -0.25, 0.75]])
    np.testing.assert_allclose(group_advantages(REWARDS, norm="mean_only"), centred, atol=1e-7)
    # All 12 rewards: 7 ones, mean 7/12, unbiased variance (7 (5/12)^2 + 5 (7/12)^2) / 11 = 35/132.
    np.testing.assert_allclose(group_advantages(REWARDS, norm="batch_std"),
                               centred / (np.sqrt(35 / 132) + EPS), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(group_advantages(REWARDS, norm="none"), REWARDS)


def test_flat_layout_matches_grouped_and_jits():
    flat = REWARDS.reshape(-1)
    for norm in ("group_std", "mean_only", "batch_std", "none"):
        got = jax.jit(group_advantages, static_argnums=1, static_argnames="norm")(flat, 4, norm=norm)
        assert got.shape == (12,)
        np.testing.assert_allclose(got, np.asarray(group_advantages(REWARDS, norm=norm)).reshape(-1), rtol=1e-6)


def test_advantage_errors():
    with pytest.raises(ValueError, match="unknown advantage norm"):
        group_advantages(REWARDS, norm="rloo")
    with pytest.raises(ValueError, match="do not split into groups"):
        group_advantages(REWARDS.reshape(-1), 5)
    with pytest.raises(ValueError, match="pass \\[num_groups, G\\]"):
        group_advantages(REWARDS.reshape(-1))
    with pytest.raises(ValueError, match="more than 1 responses"):
        group_advantages(np.ones((3, 1)))


def test_mixed_group_mask():
    np.testing.assert_array_equal(mixed_group_mask(REWARDS), [True, False, True])
    np.testing.assert_array_equal(jax.jit(mixed_group_mask, static_argnums=1)(REWARDS.reshape(-1), 4),
                                  [True, False, True])


def test_select_mixed_groups_fills_static_batch():
    # Six over-sampled groups of 3; mixed ones are 1, 3 and 4.
    rewards = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [0.1, 0, 0], [0, 0, 0]], np.float32)
    index, weight = select_mixed_groups(rewards, 2)
    np.testing.assert_array_equal(index, [1, 3])
    np.testing.assert_array_equal(weight, [1, 1])
    index, weight = select_mixed_groups(rewards.reshape(-1), 5, group_size=3)
    np.testing.assert_array_equal(index, [1, 3, 4, 0, 0])
    np.testing.assert_array_equal(weight, [1, 1, 1, 0, 0])
    assert index.dtype == np.int64 and weight.dtype == np.float32


def test_select_mixed_groups_spreads_kept_groups_over_minibatches():
    """With blocks = mu, kept group j lands in block j % mu: no minibatch is all padding while groups remain."""
    rewards = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1], [0.1, 0, 0], [0, 0, 0]], np.float32)
    index, weight = select_mixed_groups(rewards, 8, blocks=4)       # 3 mixed groups, 4 blocks of 2 slots
    np.testing.assert_array_equal(weight.reshape(4, 2), [[1, 0], [1, 0], [1, 0], [0, 0]])
    np.testing.assert_array_equal(index[weight > 0], [1, 3, 4])       # first-come order kept
    index, weight = select_mixed_groups(rewards, 2, blocks=2)        # more mixed than slots: the first 2
    np.testing.assert_array_equal(index, [1, 3])
    index, weight = select_mixed_groups(rewards, 6, blocks=4)        # slots by block: [0 0 1 2 2 3]
    np.testing.assert_array_equal(weight, [1, 0, 1, 1, 0, 0])          # blocks 0, 1, 2 get one each
    np.testing.assert_array_equal(index[weight > 0], [1, 3, 4])
    with pytest.raises(ValueError, match="blocks"):
        select_mixed_groups(rewards, 6, blocks=0)


@pytest.mark.parametrize("length,expected", [(10, 0.0), (16, 0.0), (17, -0.25), (18, -0.5), (19, -0.75),
                                             (20, -1.0), (25, -1.0)])
def test_overlong_penalty_values(length, expected):
    # L_max = 20, L_cache = 4: free up to 16 tokens, linear to -1 at 20, -1 beyond.
    np.testing.assert_allclose(overlong_penalty(length, 20, 4), expected, atol=1e-7)
    np.testing.assert_allclose(overlong_penalty(np.array([length]), 20, 4, factor=0.5), [0.5 * expected],
                               atol=1e-7)


def test_overlong_penalty_rejects_bad_buffer():
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty(3, 10, 11)


def test_overlong_penalty_cache_bounds():
    """The soft zone may be the whole budget (cache_length = max_length) or one token; an empty zone or one longer than
    the budget is refused."""
    np.testing.assert_allclose(overlong_penalty(np.array([0, 10, 20]), 20, 20), [0.0, -0.5, -1.0], atol=1e-7)
    np.testing.assert_allclose(overlong_penalty(np.array([19, 20, 21]), 20, 1), [0.0, -1.0, -1.0], atol=1e-7)
    for cache in (0, 21):
        with pytest.raises(ValueError, match="0 < cache_length <= max_length"):
            overlong_penalty(np.array([1]), 20, cache)


def test_group_std_with_the_fewest_responses_ddof_allows():
    """G = ddof + 1 is the smallest group whose sample std exists; G = ddof is refused."""
    adv = group_advantages(np.array([1.0, 0.0, 1.0, 1.0]), 2, ddof=1)
    z = 0.5 / np.sqrt(0.5)  # mean 0.5, sample std sqrt(0.5); the constant group gets 0
    np.testing.assert_allclose(adv, [z, -z, 0.0, 0.0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ddof=1 needs more than 1"):
        group_advantages(np.array([1.0, 0.0]), 1, ddof=1)


def test_select_mixed_groups_in_one_block():
    """The default (one minibatch): the first P mixed groups in order, then padding (group 0, weight 0)."""
    rewards = np.array([[1, 1], [0, 1], [1, 0], [0, 0], [1, 0]], np.float32)
    index, weight = select_mixed_groups(rewards, 4)
    assert index.tolist() == [1, 2, 4, 0] and weight.tolist() == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        select_mixed_groups(rewards, 4, blocks=0)
