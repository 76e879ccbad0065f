"""make_optimizer / make_schedule against AdamW and the schedules written out by hand in float64 NumPy.

The reference spells out M1's numbers as literals (beta1 0.9, beta2 0.95, eps 1e-15, decoupled weight decay on
matrices only, global-norm clipping before the moments) instead of reading them from TrainConfig, so a changed
default, a widened decay mask, a dropped clip or an off-by-one in the schedule all show up as a different update.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m1jax.train import TrainConfig, make_optimizer, make_schedule

B1, B2, EPS = 0.9, 0.95, 1e-15  # M1's AdamW (the published RL recipe); verl's 0.999 / 1e-8 did not converge there


def schedule_np(step, *, lr, warmup, total, kind, final_ratio):
    """Linear warm-up 0 -> lr over ``warmup`` steps, then cosine / linear decay to final_ratio * lr at ``total``
    (held there afterwards), or constant."""
    if step < warmup:
        return lr * step / warmup
    decay = max(total - warmup, 1)
    frac = min(step - warmup, decay) / decay
    if kind == "cosine":
        return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
    if kind == "linear":
        return lr * (1 - (1 - final_ratio) * frac)
    return lr


def adamw_np(params, grads_per_step, lrs, *, weight_decay, clip_norm):
    """float64 AdamW: per step clip the whole gradient to global norm ``clip_norm``, update the moments with it,
    bias-correct, then p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p) with wd only on leaves with ndim >= 2."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (g, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in g.items()}
        if clip_norm is not None:
            norm = math.sqrt(sum(float(np.sum(x * x)) for x in g.values()))
            if norm > clip_norm:
                g = {k: x * (clip_norm / norm) for k, x in g.items()}
        for k in p:
            m[k] = B1 * m[k] + (1 - B1) * g[k]
            v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - B1 ** t), v[k] / (1 - B2 ** t)
            decay = weight_decay * p[k] if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + EPS) + decay)
    return p


def _problem(steps, seed=0):
    """Params with a matrix, a stacked [R, D, F] matrix, a norm gain [D] and a bias-like [F] leaf, plus per-step
    gradients. Every other step's gradient is scaled far above the clip norm (the clip acts) or below it (it does
    not). The ``tiny`` leaf's gradient is ~1e-9 (~4e-11 after clipping): its Adam step m/(sqrt(v)+eps) is order 1
    only because eps is 1e-15; eps 1e-8 would shrink it 10 to 250-fold."""
    rng = np.random.default_rng(seed)
    params = {"kernel": rng.normal(size=(4, 3)), "stacked": rng.normal(size=(2, 4, 3)),
              "gain": 1.0 + 0.1 * rng.normal(size=(4,)), "tiny": rng.normal(size=(3,))}
    params = {k: v.astype(np.float32) for k, v in params.items()}
    grads = []
    for s in range(steps):
        scale = 5.0 if s % 2 == 0 else 0.05
        g = {k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
        g["tiny"] = (1e-9 * rng.normal(size=params["tiny"].shape)).astype(np.float32)
        grads.append(g)
    return params, grads


def _run_optimizer(tc, params, grads):
    tx = make_optimizer(tc)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
    for g in grads:
        p, state = step(p, state, {k: jnp.asarray(v) for k, v in g.items()})
    return {k: np.asarray(v, np.float64) for k, v in p.items()}


def _apply(tx, p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s


@pytest.mark.parametrize("kind,warmup,clip", [("cosine", 2, 1.0), ("linear", 3, 1.0), ("constant", 0, 1.0),
                                              ("cosine", 0, None)])
def test_adamw_steps_match_numpy(kind, warmup, clip):
    steps, total = 9, 7  # runs past total_steps: the schedule must hold at its floor
    tc = TrainConfig(learning_rate=0.05, schedule=kind, warmup_steps=warmup, total_steps=total, weight_decay=0.3,
                     clip_norm=clip)
    params, grads = _problem(steps)
    lrs = [schedule_np(s, lr=0.05, warmup=warmup, total=total, kind=kind, final_ratio=tc.final_lr_ratio)
           for s in range(steps)]
    want = adamw_np(params, grads, lrs, weight_decay=0.3, clip_norm=clip)
    got = _run_optimizer(tc, params, grads)
    for k in params:
        # fp32 state and arithmetic over 9 steps: updates are ~lr = 0.05 in size, so a few fp32 ulps of p (~1e-7)
        # per step; a wrong mask / constant / schedule step moves p by >= 1e-3.
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=2e-6, err_msg=k)
    # the run itself moved every leaf (a no-op optimizer would fail above too; this names it)
    assert all(np.max(np.abs(got[k] - params[k])) > 1e-2 for k in params)


def test_norm_gains_are_not_decayed():
    """With zero gradients only weight decay moves parameters: matrices shrink by (1 - lr * wd) per step, 1-D leaves
    stay exactly put."""
    tc = TrainConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5, clip_norm=1.0)
    params, _ = _problem(1)
    zeros = [{k: np.zeros_like(v) for k, v in params.items()}] * 3
    got = _run_optimizer(tc, params, zeros)
    for k, v in params.items():
        factor = (1 - 0.1 * 0.5) ** 3 if v.ndim >= 2 else 1.0
        np.testing.assert_allclose(got[k], v.astype(np.float64) * factor, rtol=1e-6, atol=0, err_msg=k)


def test_defaults_are_m1_adamw():
    tc = TrainConfig()
    assert (tc.b1, tc.b2, tc.eps) == (B1, B2, EPS)
    assert tc.weight_decay > 0 and tc.clip_norm == 1.0


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_schedule_values(kind, warmup):
    tc = TrainConfig(learning_rate=3e-4, schedule=kind, warmup_steps=warmup, total_steps=12, final_lr_ratio=0.1)
    sched = make_schedule(tc)
    for step in range(16):
        want = schedule_np(step, lr=3e-4, warmup=warmup, total=12, kind=kind, final_ratio=0.1)
        # fp32 evaluation of cos / the linear ramp: relative 1e-6 of values ~3e-4
        assert abs(float(sched(step)) - want) <= 1e-6 * 3e-4 + 1e-12, (step, float(sched(step)), want)
    # independent landmarks: warm-up starts at 0 and reaches the peak; the decay ends at final_lr_ratio * lr
    if warmup:
        assert float(sched(0)) == 0.0
    assert abs(float(sched(warmup)) - 3e-4) < 1e-10
    assert abs(float(sched(12)) - (3e-4 if kind == "constant" else 3e-5)) < 1e-10


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("warmup,total", [(4, 5), (4, 4)])
def test_schedule_with_a_decay_of_one_step_or_none(kind, warmup, total):
    """total_steps = warmup + 1 decays in exactly one step; total_steps = warmup (no room to decay) still gives a
    schedule, the peak at the end of warm-up and the final value after it."""
    tc = TrainConfig(learning_rate=3e-4, schedule=kind, warmup_steps=warmup, total_steps=total, final_lr_ratio=0.1)
    sched = make_schedule(tc)
    for step in range(warmup + 4):
        want = schedule_np(step, lr=3e-4, warmup=warmup, total=total, kind=kind, final_ratio=0.1)
        assert abs(float(sched(step)) - want) <= 1e-6 * 3e-4 + 1e-12, (step, float(sched(step)), want)
    assert abs(float(sched(warmup + 1)) - 3e-5) < 1e-10

