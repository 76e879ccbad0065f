"""AdamW with M1's settings and the learning-rate schedules (linear warm-up, then cosine / linear / constant)."""
from __future__ import annotations

import jax
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


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (unless ``clip_norm`` is None), then AdamW decaying matrices only."""
    def decay_mask(params):
        return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

    adamw = optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return adamw if tc.clip_norm is None else optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw)
