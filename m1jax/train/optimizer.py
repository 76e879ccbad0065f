"""AdamW with M1's settings and the learning-rate schedules (linear warm-up, then cosine / linear / constant).

``make_optimizer`` is the optax chain (global-norm clip, then AdamW decaying matrices only): it defines the optimizer
state the train state and its checkpoints hold, and the update for callers that want an optax transformation.
``adamw_update`` computes the same update on the same state as one element-wise expression per parameter leaf, so
that XLA can fuse each leaf's whole update into one pass (read param, grad, m, v; write param, m, v) instead of
materialising the clipped gradient, the moments and the update as separate passes. Its global norm comes from the
caller, which needs it as a metric anyway, so the gradient is reduced once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from m1jax.train.config import TrainConfig


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then the decay until ``total_steps``."""
    lr, end = tc.learning_rate, tc.learning_rate * tc.final_lr_ratio
    decay_steps = max(tc.total_steps - tc.warmup_steps, 1)
    if tc.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=tc.final_lr_ratio)
    elif tc.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        after = optax.constant_schedule(lr)
    if tc.warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, tc.warmup_steps), after], [tc.warmup_steps])


def _decayed(p) -> bool:
    """Weight decay applies to matrices (ndim >= 2), not to norm gains and other vectors."""
    return p.ndim >= 2


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (unless ``clip_norm`` is None), then AdamW decaying matrices only."""
    def decay_mask(params):
        return jax.tree_util.tree_map(_decayed, params)

    adamw = optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return adamw if tc.clip_norm is None else optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw)


def adamw_update(tc: TrainConfig, grads, opt_state, params, grad_norm: jax.Array, keep_if: jax.Array | None = None):
    """(params, opt_state) after one ``make_optimizer(tc)`` update, computed leaf by leaf in one expression.

    ``opt_state``: ``make_optimizer(tc).init(params)``'s structure (returned in the same structure); ``grad_norm``:
    the global L2 norm of ``grads`` (``optax.tree.norm``); ``keep_if``: a boolean scalar, or None; when it is False
    the params and the whole optimizer state come back unchanged (the caller's skip of a non-finite update). The
    gradient is cast to each parameter's dtype first. The arithmetic is optax's, term by term (moments as
    ``(1 - b) * g**k + b * m``, bias corrections, eps outside the square root, decoupled decay, ``p + (-lr) * u``),
    except the clip, which multiplies by ``clip / norm`` where optax divides by the norm and multiplies by ``clip``
    (an ulp of difference).
    """
    clip = tc.clip_norm is not None
    adam, masked, sched = opt_state[1] if clip else opt_state
    count = optax.safe_increment(adam.count)
    bc1 = (1 - tc.b1 ** count).astype(jnp.float32)
    bc2 = (1 - tc.b2 ** count).astype(jnp.float32)
    step_size = -1 * make_schedule(tc)(sched.count)
    # The clip as one scalar factor (optax divides every element by the norm, then multiplies by clip_norm: the
    # same up to rounding): a multiply XLA fuses into each consumer instead of a clipped gradient it materialises.
    scale = jnp.where(grad_norm < tc.clip_norm, 1.0, tc.clip_norm / grad_norm) if clip else None

    def leaf(p, g, m, v):
        g = g.astype(p.dtype)
        if clip:
            g = g * scale.astype(g.dtype)
        m_new = (1 - tc.b1) * g + tc.b1 * m
        v_new = (1 - tc.b2) * g ** 2 + tc.b2 * v
        u = (m_new / bc1.astype(m_new.dtype)) / (jnp.sqrt(v_new / bc2.astype(v_new.dtype)) + tc.eps)
        if _decayed(p):
            u = u + tc.weight_decay * p
        p_new = (p + jnp.asarray(step_size, u.dtype) * u).astype(p.dtype)
        if keep_if is not None:
            p_new, m_new, v_new = (jnp.where(keep_if, new, old) for new, old in ((p_new, p), (m_new, m), (v_new, v)))
        return p_new, m_new, v_new

    treedef = jax.tree_util.tree_structure(params)
    out = [leaf(*xs) for xs in zip(*(treedef.flatten_up_to(t) for t in (params, grads, adam.mu, adam.nu)))]
    new_params, mu, nu = (treedef.unflatten(col) for col in zip(*out))
    new_count, new_sched = count, optax.safe_increment(sched.count)
    if keep_if is not None:
        new_count = jnp.where(keep_if, new_count, adam.count)
        new_sched = jnp.where(keep_if, new_sched, sched.count)
    new = (adam._replace(count=new_count, mu=mu, nu=nu), masked, sched._replace(count=new_sched))
    return new_params, ((opt_state[0], new) if clip else new)
