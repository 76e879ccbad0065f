"""Policy losses against closed forms (the gradient facts of m1jax/rl/losses.py).

The 'policy' is tabular: its parameters are the logits z [B, T, V] and logp = log_softmax(z)[token], so for a loss
L = sum_{i,t} -w_{i,t} c_{i,t} logp_{i,t} the exact gradient is dL/dz_{i,t} = -w_{i,t} c_{i,t} (e_token - softmax(z)).
Expected coefficients c are written by hand from the table below; weights w are computed here from the definition of
each aggregation mode.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.rl.losses import aggregate, policy_loss

V = 5

# (A, r) per token: the standard cases plus extra cases around each bound; ratio factors f with coefficient c = f * A.
#            A     r     cispo  cispo  cispo   dapo  ppo    cispo   ppo
#                        cap 5  eps.28 min.6   .2/.28 .2/.2 masked  dual 2.5
CASES = np.array([
    (+0.7, 1.5,  1.5,  1.28, 1.5,   0.0,  0.0,  0.0,   0.0),
    (-1.3, 0.5,  0.5,  0.5,  0.6,   0.0,  0.0,  0.0,   0.0),
    (+1.0, 0.5,  0.5,  0.5,  0.6,   0.5,  0.5,  0.5,   0.5),
    (-1.0, 3.0,  3.0,  1.28, 3.0,   3.0,  3.0,  3.0,   0.0),
    (+1.2, 1.1,  1.1,  1.1,  1.1,   1.1,  1.1,  1.1,   1.1),
    (-0.4, 0.9,  0.9,  0.9,  0.9,   0.9,  0.9,  0.9,   0.9),
    (+0.9, 1.25, 1.25, 1.25, 1.25,  1.25, 0.0,  1.25,  0.0),
    (+1.0, 7.0,  5.0,  1.28, 5.0,   0.0,  0.0,  0.0,   0.0),
    (-0.8, 0.1,  0.1,  0.1,  0.6,   0.0,  0.0,  0.0,   0.0),
    (-1.0, 6.0,  5.0,  1.28, 5.0,   6.0,  6.0,  5.0,   0.0),
    (-1.1, 2.0,  2.0,  1.28, 2.0,   2.0,  2.0,  2.0,   2.0),
])
COLUMN = {"cispo": 2, "cispo_eps": 3, "cispo_min": 4, "dapo": 5, "ppo": 6, "cispo_masked": 7, "dual": 8}

# 4 rows of 4 tokens; row lengths 4, 3, 2, 2 hold the 11 cases; the 5 padded slots hold junk that must not count.
LENGTHS = np.array([4, 3, 2, 2])
MASK = (np.arange(4)[None, :] < LENGTHS[:, None]).astype(np.float32)


def _tabular_batch(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(4, 4, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(4, 4))
    adv = np.full((4, 4), 1.0, np.float32)  # junk in padded slots: A = +1, r = 50
    ratio = np.full((4, 4), 50.0)
    adv[MASK > 0], ratio[MASK > 0] = CASES[:, 0], CASES[:, 1]
    logp0 = np.asarray(_logp(jnp.asarray(z), tokens))
    old_logp = (logp0 - np.log(ratio)).astype(np.float32)
    return z, tokens, old_logp, adv, ratio


def _logp(z, tokens):
    return jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens[..., None], axis=-1)[..., 0]


def _agg_weights(agg, group_size=2, norm_constant=None):
    """w[i, t] of each token in the aggregated sum, straight from the definitions."""
    w = np.zeros((4, 4))
    for i in range(4):
        n_i = LENGTHS[i]
        if agg == "batch_token_mean":
            w[i, :n_i] = 1.0 / LENGTHS.sum()
        elif agg == "sample_mean":
            w[i, :n_i] = 1.0 / (4 * n_i)
        elif agg == "group_token_mean":
            g = i // group_size
            group_tokens = LENGTHS[g * group_size:(g + 1) * group_size].sum()
            w[i, :n_i] = 1.0 / ((4 // group_size) * group_tokens)
        elif agg == "const_norm":
            w[i, :n_i] = 1.0 / (16 if norm_constant is None else norm_constant)
    return w


def _expected_grad(z, tokens, weight, coef):
    """dL/dz for L = -sum w c logp, shapes [B, T] -> [B, T, V]."""
    return -(weight * coef)[..., None] * (np.eye(V)[tokens] - _softmax64(z))


def _softmax64(z):
    e = np.exp(z.astype(np.float64))
    return e / e.sum(-1, keepdims=True)


def _coef(column):
    c = np.zeros((4, 4))
    c[MASK > 0] = CASES[:, COLUMN[column]] * CASES[:, 0]
    return c


def _grad(name, z, tokens, old_logp, adv, mask=MASK, **knobs):
    def loss(z):
        return policy_loss(name, _logp(z, tokens), old_logp, adv, mask, **knobs)[0]
    return np.asarray(jax.grad(loss)(jnp.asarray(z)))


GRADIENT_CASES = [
    # name, knobs, column of CASES, aggregation used (the loss's default unless given in knobs)
    ("cispo", {}, "cispo", "batch_token_mean"),
    ("cispo", {"eps_is_high": 0.28}, "cispo_eps", "batch_token_mean"),
    ("cispo", {"ratio_max": 1.28}, "cispo_eps", "batch_token_mean"),
    ("cispo", {"ratio_min": 0.6}, "cispo_min", "batch_token_mean"),
    ("cispo", {"agg": "group_token_mean", "group_size": 2}, "cispo", "group_token_mean"),
    ("cispo_masked", {}, "cispo_masked", "batch_token_mean"),
    ("cispo_masked", {"ratio_max": None}, "dapo", "batch_token_mean"),
    ("dapo", {}, "dapo", "batch_token_mean"),
    ("dapo", {"agg": "group_token_mean", "group_size": 2}, "dapo", "group_token_mean"),
    ("ppo", {}, "ppo", "sample_mean"),
    ("ppo", {"dual_clip": 2.5}, "dual", "sample_mean"),
    ("grpo", {}, "ppo", "sample_mean"),
    ("grpo", {"eps_high": 0.28}, "dapo", "sample_mean"),
    ("drgrpo", {}, "ppo", "const_norm"),
]


@pytest.mark.parametrize("name,knobs,column,agg", GRADIENT_CASES)
def test_closed_form_gradient(name, knobs, column, agg):
    z, tokens, old_logp, adv, _ = _tabular_batch()
    expected = _expected_grad(z, tokens, _agg_weights(agg), _coef(column))
    np.testing.assert_allclose(_grad(name, z, tokens, old_logp, adv, **knobs), expected, rtol=2e-5, atol=1e-7)


def test_const_norm_constant_and_outcome_advantages():
    """Dr. GRPO with an explicit constant; advantages given per sample [B] broadcast over tokens."""
    z, tokens, old_logp, _, _ = _tabular_batch(1)
    logp0 = np.asarray(_logp(jnp.asarray(z), tokens))
    old_logp = logp0 - np.log(1.1)  # r = 1.1 everywhere: inside the trust region, coefficient r A
    adv_rows = np.array([0.5, -2.0, 1.5, -0.25], np.float32)
    coef = 1.1 * np.broadcast_to(adv_rows[:, None], (4, 4)) * MASK
    expected = _expected_grad(z, tokens, _agg_weights("const_norm", norm_constant=40.0), coef)
    got = _grad("drgrpo", z, tokens, old_logp, adv_rows, norm_constant=40.0)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


def test_traced_norm_constant_shared_across_minibatches():
    """A rollout-batch normaliser passed as a traced scalar gives the same gradient as the static constant."""
    z, tokens, old_logp, adv, _ = _tabular_batch()
    expected = _expected_grad(z, tokens, _agg_weights("const_norm", norm_constant=5.5), _coef("cispo"))

    @jax.jit
    def grad(z, constant):
        return jax.grad(lambda z: policy_loss("cispo", _logp(z, tokens), old_logp, adv, MASK, agg="const_norm",
                                              norm_constant=constant)[0])(z)
    np.testing.assert_allclose(grad(jnp.asarray(z), jnp.float32(5.5)), expected, rtol=2e-5, atol=1e-7)


def test_grpo_k3_kl_gradient():
    """GRPO's beta * k3 term adds beta * (1 - pi_ref / pi) to the loss coefficient of grad(logp)."""
    z, tokens, old_logp, adv, _ = _tabular_batch(2)
    rng = np.random.default_rng(3)
    logp = np.asarray(_logp(jnp.asarray(z), tokens), np.float64)
    ref_logp = (logp + rng.normal(scale=0.5, size=logp.shape)).astype(np.float32)
    beta = 0.04
    w = _agg_weights("sample_mean")
    loss_coef = w * (-_coef("ppo") + beta * (1.0 - np.exp(ref_logp - logp)))
    expected = loss_coef[..., None] * (np.eye(V)[tokens] - _softmax64(z))
    got = _grad("grpo", z, tokens, old_logp, adv, kl_beta=beta, ref_logp=ref_logp)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("agg", ["batch_token_mean", "sample_mean", "group_token_mean", "const_norm"])
def test_cispo_masked_without_is_clipping_equals_ppo(seed, agg):
    """M1 Eq. 6-7 with r_hat = r and PPO's mask has exactly PPO-clip's gradient."""
    rng = np.random.default_rng(seed)
    b, t = 6, 7
    z = rng.normal(size=(b, t, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(b, t))
    old_logp = np.asarray(_logp(jnp.asarray(z), tokens)) + rng.normal(scale=0.7, size=(b, t)).astype(np.float32)
    adv = rng.normal(size=(b, t) if seed % 2 else (b,)).astype(np.float32)
    mask = (rng.random((b, t)) < 0.7).astype(np.float32)
    eps_low, eps_high = rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.4)
    knobs = dict(agg=agg, eps_low=eps_low, eps_high=eps_high)
    if agg == "group_token_mean":
        knobs["group_size"] = 3
    ppo = _grad("ppo", z, tokens, old_logp, adv, mask, **knobs)
    masked = _grad("cispo_masked", z, tokens, old_logp, adv, mask, ratio_max=None, **knobs)
    assert np.abs(ppo).max() > 1e-3  # the comparison is not vacuous
    np.testing.assert_allclose(masked, ppo, rtol=1e-5, atol=1e-7)


def test_cispo_stop_gradient_matches_finite_difference_of_frozen_surrogate():
    """grad CISPO == d/dz sum(-w c logp(z)) with c = clip(r) A frozen, by float64 central differences."""
    z, tokens, old_logp, adv, ratio = _tabular_batch(4)
    c = np.minimum(ratio, 5.0) * adv * MASK / MASK.sum()

    def frozen(z64):
        logp = z64 - np.log(np.exp(z64).sum(-1, keepdims=True))
        return -np.sum(c * np.take_along_axis(logp, tokens[..., None], -1)[..., 0])

    z64, h = z.astype(np.float64), 1e-5
    fd = np.zeros_like(z64)
    for idx in np.ndindex(z64.shape):
        e = np.zeros_like(z64)
        e[idx] = h
        fd[idx] = (frozen(z64 + e) - frozen(z64 - e)) / (2 * h)
    np.testing.assert_allclose(_grad("cispo", z, tokens, old_logp, adv), fd, rtol=1e-4, atol=1e-7)


def test_cispo_loss_value_and_metrics():
    z, tokens, old_logp, adv, ratio = _tabular_batch()
    logp = _logp(jnp.asarray(z), tokens)
    entropy = np.random.default_rng(5).random((4, 4)).astype(np.float32)
    loss, m = policy_loss("cispo", logp, old_logp, adv, MASK, entropy=entropy)
    valid = MASK > 0
    weight = np.minimum(ratio, 5.0)
    np.testing.assert_allclose(loss, -np.sum((weight * adv * np.asarray(logp))[valid]) / 11, rtol=1e-5)
    np.testing.assert_allclose(m["is_cap_frac"], 2 / 11, rtol=1e-6)  # r = 7 and r = 6
    np.testing.assert_allclose(m["ratio_max"], 7.0, rtol=1e-5)  # padded junk (r = 50) is ignored
    np.testing.assert_allclose(m["ratio_min"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(m["ratio_mean"], CASES[:, 1].mean(), rtol=1e-5)
    r = CASES[:, 1]
    np.testing.assert_allclose(m["approx_kl"], np.mean(r - 1 - np.log(r)), rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], entropy[valid].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["num_tokens"], 11)
    _, m_no_entropy = policy_loss("cispo", logp, old_logp, adv, MASK)
    np.testing.assert_allclose(m_no_entropy["entropy"], -np.asarray(logp)[valid].mean(), rtol=1e-6)


@pytest.mark.parametrize("name,frac", [("dapo", 4 / 11), ("ppo", 5 / 11), ("cispo_masked", 4 / 11)])
def test_ppo_clip_fraction(name, frac):
    z, tokens, old_logp, adv, _ = _tabular_batch()
    _, m = policy_loss(name, _logp(jnp.asarray(z), tokens), old_logp, adv, MASK)
    np.testing.assert_allclose(m["ppo_clip_frac"], frac, rtol=1e-6)


def test_dual_clip_fraction():
    z, tokens, old_logp, adv, _ = _tabular_batch()
    _, m = policy_loss("ppo", _logp(jnp.asarray(z), tokens), old_logp, adv, MASK, dual_clip=2.5)
    np.testing.assert_allclose(m["dual_clip_frac"], 2 / 11, rtol=1e-6)  # (A<0, r=3) and (A<0, r=6)


@pytest.mark.parametrize("name", ["cispo", "cispo_masked", "ppo", "grpo", "dapo", "drgrpo"])
def test_non_finite_padding_does_not_leak(name):
    """-inf / NaN log-probs at padded positions change neither the loss nor the gradient."""
    z, tokens, old_logp, adv, _ = _tabular_batch()
    pad = MASK == 0
    ref_logp = np.asarray(_logp(jnp.asarray(z), tokens)) - 0.3
    knobs = dict(kl_beta=0.1, ref_logp=ref_logp) if name == "grpo" else {}

    def loss(z, poison):
        # Added, not selected with where(), so that a NaN cotangent at the padding would reach z.
        logp = _logp(z, tokens) + np.where(pad & poison, -np.inf, 0.0).astype(np.float32)
        old = np.where(pad & poison, np.nan, old_logp)
        return policy_loss(name, logp, old, adv, MASK, **knobs)[0]

    clean = jax.value_and_grad(loss)(jnp.asarray(z), False)
    dirty = jax.value_and_grad(loss)(jnp.asarray(z), True)
    assert np.isfinite(dirty[0]) and np.all(np.isfinite(dirty[1]))
    np.testing.assert_allclose(dirty[0], clean[0], rtol=1e-6)
    np.testing.assert_allclose(dirty[1], clean[1], rtol=1e-6, atol=1e-8)


# Ragged aggregation by hand: x[i, t] = 4 i + t + 1; row 3 is empty.
X = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
RAGGED = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)


@pytest.mark.parametrize("agg,kwargs,mask,expected", [
    ("batch_token_mean", {}, RAGGED, 30 / 7),
    ("sample_mean", {}, RAGGED, (2.5 + 5.5 + 9) / 3),           # the empty row is not a sample
    ("group_token_mean", {"group_ids": [0, 0, 1, 1]}, RAGGED, (21 / 6 + 9 / 1) / 2),
    ("group_token_mean", {"group_ids": [0, 1, 0, 1]}, RAGGED, (19 / 5 + 11 / 2) / 2),
    ("group_token_mean", {"group_ids": [0, 0, 1, 1]}, RAGGED * np.array([[1], [1], [0], [0]]), 21 / 6),
    ("const_norm", {}, RAGGED, 30 / 16),
    ("const_norm", {"norm_constant": 10.0}, RAGGED, 3.0),
    ("batch_token_mean", {}, RAGGED * np.array([[1], [0.5], [2], [1]]), (10 + 0.5 * 11 + 2 * 9) / (4 + 1 + 2)),
])
def test_aggregation_ragged(agg, kwargs, mask, expected):
    kwargs = {k: jnp.asarray(v) if k == "group_ids" else v for k, v in kwargs.items()}
    np.testing.assert_allclose(aggregate(jnp.asarray(X), jnp.asarray(mask), agg, **kwargs), expected, rtol=1e-6)


def test_group_size_equals_group_ids_and_jit():
    """group_size=G and explicit ids agree; the loss jits with static knobs and traced ids."""
    z, tokens, old_logp, adv, _ = _tabular_batch()
    logp = _logp(jnp.asarray(z), tokens)
    eager, _ = policy_loss("cispo", logp, old_logp, adv, MASK, agg="group_token_mean", group_size=2)
    jitted = jax.jit(functools.partial(policy_loss, "cispo", agg="group_token_mean"))
    traced, _ = jitted(logp, old_logp, adv, MASK, group_ids=jnp.array([7, 7, 3, 3]))
    np.testing.assert_allclose(traced, eager, rtol=1e-6)
    jitted_masked = jax.jit(functools.partial(policy_loss, "cispo_masked", agg="sample_mean", ratio_max=2.0))
    np.testing.assert_allclose(jitted_masked(logp, old_logp, adv, MASK)[0],
                               policy_loss("cispo_masked", logp, old_logp, adv, MASK, agg="sample_mean",
                                           ratio_max=2.0)[0], rtol=1e-6)


@pytest.mark.parametrize("name,knobs,shapes,message", [
    ("reinforce", {}, {}, "unknown loss"),
    ("cispo", {"eps_high": 0.28}, {}, "does not take knob"),
    ("ppo", {"ratio_max": 5.0}, {}, "does not take knob"),
    ("dapo", {"clip_eps": 0.2}, {}, "does not take knob"),
    ("cispo", {"ratio_max": 5.0, "eps_is_high": 0.28}, {}, "not both"),
    ("cispo", {"ratio_min": 2.0, "ratio_max": 1.5}, {}, "must be below"),
    ("cispo", {"ratio_min": -0.1}, {}, "ratio_min"),
    ("cispo", {"agg": "token_mean"}, {}, "unknown aggregation"),
    ("cispo", {"agg": "group_token_mean"}, {}, "exactly one of group_size or group_ids"),
    ("cispo", {"agg": "group_token_mean", "group_size": 3}, {}, "dividing batch"),
    ("cispo", {"group_size": 2}, {}, "only apply to agg='group_token_mean'"),
    ("dapo", {"norm_constant": 10.0}, {}, "only applies to agg='const_norm'"),
    ("grpo", {"kl_beta": 0.04}, {}, "needs ref_logp"),
    ("ppo", {"dual_clip": 0.9}, {}, "dual_clip"),
    ("dapo", {"eps_low": -0.1}, {}, "eps_low"),
    ("cispo", {}, {"old_logp": (4, 3)}, "old_logp has shape"),
    ("cispo", {}, {"mask": (4,)}, "mask has shape"),
    ("cispo", {}, {"advantages": (3,)}, "advantages has shape"),
    ("cispo", {}, {"logp": (16,)}, "logp must be"),
    ("grpo", {"kl_beta": 0.1, "ref_logp": np.zeros((4, 5), np.float32)}, {}, "ref_logp has shape"),
])
def test_invalid_inputs_raise(name, knobs, shapes, message):
    arrays = dict(logp=(4, 4), old_logp=(4, 4), advantages=(4,), mask=(4, 4))
    arrays.update(shapes)
    args = [-np.ones(arrays[k], np.float32) for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(ValueError, match=message):
        policy_loss(name, *args, **knobs)


# Decision points of the hand-built minibatch: every other active token (cases 0, 2, 4, 6, 8, 10 of CASES).
DECISION = np.zeros((4, 4), bool)
DECISION[MASK > 0] = np.arange(len(CASES)) % 2 == 0


@pytest.mark.parametrize("name,knobs,column", [("cispo", {}, "cispo"), ("cispo", {"eps_is_high": 0.28}, "cispo_eps"),
                                               ("cispo_masked", {}, "cispo_masked"), ("dapo", {}, "dapo")])
def test_token_coefficients_clip_fractions_and_gradient_share(name, knobs, column):
    """dL/dlogp against the closed form (-c/N on every active token), which tokens are clipped overall and at the
    decision points, and the decision points' share of sum |dL/dlogp|, all by hand from CASES."""
    from m1jax.rl.losses import gradient_share, token_coefficients
    z, tokens, old_logp, adv, ratio = _tabular_batch()
    logp = _logp(jnp.asarray(z), tokens)
    n = LENGTHS.sum()
    want = -_coef(column) / n
    got = np.asarray(token_coefficients(name, logp, old_logp, adv, MASK, **knobs))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    share = float(gradient_share(jnp.asarray(got), MASK, DECISION))
    assert share == pytest.approx(np.abs(want)[DECISION].sum() / np.abs(want).sum(), rel=1e-5)

    _, metrics = policy_loss(name, logp, old_logp, adv, MASK, decision=DECISION, **knobs)
    a, r = CASES[:, 0], CASES[:, 1]
    dec = np.arange(len(CASES)) % 2 == 0
    dapo_drops = ((a > 0) & (r > 1.28)) | ((a < 0) & (r < 0.8))  # DAPO's mask M = 0 (its gradient is 0 there)
    assert np.array_equal(dapo_drops, CASES[:, COLUMN["dapo"]] == 0)
    expected = {}
    if name == "dapo":
        expected["ppo_clip_frac"] = dapo_drops
    else:
        cap = 5.0 if not knobs else 1.28
        expected["is_cap_frac"] = r > cap
        expected["ppo_clip_frac" if name == "cispo_masked" else "trust_region_frac"] = dapo_drops
    assert sorted(k for k in metrics if k.endswith("_frac") and k not in ("decision_frac",)) == sorted(expected)
    for key, tokens_clipped in expected.items():
        assert float(metrics[key]) == pytest.approx(tokens_clipped.mean()), key
        assert float(metrics[key + "_decision"]) == pytest.approx(tokens_clipped[dec].mean()), key
    assert float(metrics["decision_frac"]) == pytest.approx(dec.mean())
    # The tokens DAPO drops carry no gradient under dapo and cispo_masked, and keep it under plain CISPO.
    kept = np.abs(got[MASK > 0]) > 0
    assert np.array_equal(kept, ~dapo_drops if name in ("dapo", "cispo_masked") else np.ones_like(kept))
