"""The jitted RL update: mu off-policy minibatch updates per rollout batch (phase 3 of the RL step, docs/rl.md).

``make_rl_update(graphdef, ucfg)`` returns ``update(params, opt_state, batch) -> (params, opt_state, metrics)``, one
compiled program per (graphdef, UpdateConfig, batch shapes); params and optimizer state are donated and come back
with the placement they went in with (sharded on a mesh, or on one device). Inside:

1. ``old_logp``: the sampler's fp32 log-probs (default; M1/ScaleRL: the IS ratio then also absorbs any train/infer
   mismatch), or the trainer's, recomputed once with the pre-update params (``old_logp="trainer"``, verl's layout).
2. A ``lax.scan`` over the mu minibatches (contiguous row blocks; whole groups, since the G rows of a group are
   adjacent): trainer log-probs through the backbone and the LM head (fp32 operands unless ``fp32_head=False``),
   ``policy_loss`` of the chosen loss, its gradient, global-norm clipping and AdamW (M1's betas 0.9 / 0.95).
3. Metrics per minibatch ([mu] arrays, so the clip fractions can be read against the minibatch index); the first
   minibatch runs at the pre-update params, so its Pearson correlation of sampler vs trainer token probabilities is
   the train/infer mismatch metric of M1's Figure 3 (``mismatch_pearson``), and its max |trainer - sampler logp|
   (about 0 when sampler and trainer agree).

The mechanism metrics: the gradient is taken in two steps, the loss's gradient with respect to the token
log-probs (each token's coefficient dL/dlogp, exact for every loss) and then its pullback through the model (the same
computation as one ``value_and_grad``). With the task's decision points in the batch (``decision``), each minibatch
reports the share of sum |dL/dlogp| carried by decision tokens (``grad_share_decision``) and every clip fraction of
the loss restricted to them (``ppo_clip_frac_decision``, ``is_cap_frac_decision``, ...): where PPO-style clipping
drops the fork tokens' gradient and CISPO keeps it.

Under ``jax.set_mesh`` the minibatches are spread over the batch axes of the mesh (each minibatch's rows on every
data-parallel device) whatever the layout of the incoming batch.

Normaliser: with ``shared_normaliser`` a ``batch_token_mean`` loss is evaluated as ``const_norm`` with
the whole rollout batch's token count / mu, so every minibatch of one rollout batch shares one normaliser and mu
minibatch gradients add up to the full-batch token mean (instead of each minibatch re-normalising by its own count).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from m1jax.config import Config, ConfigError, setting
from m1jax.layers.embed import lm_logits
from m1jax.rl import losses
from m1jax.train import TrainConfig, head_kernel, make_optimizer
from sharding.rules import constrain, tree_shardings_like

OLD_LOGP_SOURCES = ("sampler", "trainer")
# Python-side trace counts of the jitted update (incremented only while tracing): the no-recompilation test reads it.
TRACE_COUNTS: collections.Counter = collections.Counter()


# The loss knobs an UpdateConfig carries (None: the loss's default, ``losses.default_knobs``).
KNOB_FIELDS = ("agg", "ratio_max", "eps_is_high", "ratio_min", "eps_low", "eps_high", "dual_clip")


@dataclasses.dataclass(frozen=True)
class UpdateConfig(Config):
    """Static settings of the RL update (hashable: part of the compiled program's identity).

    loss: a name in ``losses.LOSSES``. Its knobs (``policy_loss``), None meaning the loss's default: agg,
    ratio_max (CISPO's absolute IS-weight cap; inf: no cap), eps_is_high (M1-style cap 1 + eps_is_high instead),
    ratio_min, eps_low / eps_high (PPO's trust region, also cispo_masked's mask), dual_clip.
    mu: minibatch updates per rollout batch (the batch's rows are split into mu equal blocks).
    Optimiser: AdamW(b1, b2, eps, weight_decay on matrices) after global-norm clipping, constant lr after a linear
    warm-up of ``warmup_steps`` optimizer updates. M1's betas are 0.9 / 0.95; eps 1e-8 here (M1's 1e-15 is an
    ablation).
    fp32_head: trainer LM head with fp32 operands (M1); False uses the model's compute dtype (the mismatch ablation).
    old_logp: log pi_old from the sampler (M1/ScaleRL) or recomputed by the trainer before the first minibatch.
    shared_normaliser: one normaliser per rollout batch for batch_token_mean (see the module docstring).
    """
    loss: str = setting("cispo", choices=losses.LOSSES, help="policy loss")
    agg: str | None = setting(None, choices=losses.AGGREGATIONS, help="loss aggregation (None: the loss's)")
    ratio_max: float | None = setting(None, help="CISPO absolute IS-weight cap (None: 5.0; inf: no cap)")
    eps_is_high: float | None = setting(None, help="CISPO cap 1 + eps_is_high instead of ratio_max")
    ratio_min: float | None = setting(None, help="CISPO lower bound of the IS weight (None: none)")
    eps_low: float | None = setting(None, help="PPO trust region low (None: the loss's)")
    eps_high: float | None = setting(None, help="PPO trust region high (None: the loss's)")
    dual_clip: float | None = setting(None, help="PPO dual clip c > 1 (None: off)")
    mu: int = setting(8, help="minibatch updates per rollout batch")
    learning_rate: float = setting(1e-4, help="constant learning rate after the warm-up")
    warmup_steps: int = setting(0, help="linear warm-up, in optimizer updates")
    b1: float = 0.9
    b2: float = 0.95
    eps: float = setting(1e-8, help="AdamW eps")
    weight_decay: float = 0.0
    clip_norm: float | None = setting(1.0, help="global-norm gradient clipping (None: off)")
    fp32_head: bool = setting(True, resume=False, help="trainer LM head with fp32 operands")
    old_logp: str = setting("sampler", choices=OLD_LOGP_SOURCES, help="source of log pi_old")
    shared_normaliser: bool = True

    def validate(self) -> None:
        if self.mu < 1:
            raise ConfigError(f"UpdateConfig.mu must be >= 1, got {self.mu}")
        try:
            losses.check_knobs(self.loss, self.knobs)
        except ValueError as err:
            raise ConfigError(f"UpdateConfig: {err}") from None

    @property
    def knobs(self) -> dict[str, Any]:
        """The loss knobs that are set (not None)."""
        return {k: getattr(self, k) for k in KNOB_FIELDS if getattr(self, k) is not None}

    def with_loss(self, loss: str, **knobs) -> "UpdateConfig":
        """This config with another loss and exactly the given knobs (the others back to None)."""
        return self.replace(loss=loss, **{**dict.fromkeys(KNOB_FIELDS), **knobs})

    @property
    def aggregation(self) -> str:
        return self.agg or losses.default_knobs(self.loss)["agg"]

    def optimizer(self) -> optax.GradientTransformation:
        tc = TrainConfig(learning_rate=self.learning_rate, schedule="constant", warmup_steps=self.warmup_steps,
                         b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay,
                         clip_norm=self.clip_norm)
        return make_optimizer(tc)


def response_logprobs(graphdef, params, tokens, start, num_new: int, *, fp32_head: bool = True):
    """Trainer log-probs of the response tokens.

    tokens: [B, P + N] int32 (left-padded prompt ++ response); start: [B] int32 first valid slot; num_new: N.
    Returns [B, N] float32: log pi(tokens[:, P + j] | tokens[:, :P + j]).

    The left padding is its own segment (segment id 0, the sequence 1): lightning states reset at the boundary,
    softmax attention does not cross it, and positions restart at 0 on the first prompt token, exactly as the
    sampler's cache (``start``) sees the row.
    """
    model = nnx.merge(graphdef, params)
    t = tokens.shape[1]
    p = t - num_new
    segment_ids = (jnp.arange(t, dtype=jnp.int32)[None, :] >= start[:, None]).astype(jnp.int32)
    hidden = model.backbone(tokens, segment_ids=segment_ids).hidden[:, p - 1:t - 1]  # predicts tokens[:, p:]
    logits = lm_logits(hidden, head_kernel(model), fp32=fp32_head, compute_dtype=jnp.dtype(model.cfg.compute_dtype),
                       precision=model.cfg.lm_head_precision)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, p:, None], axis=-1)[..., 0]


def pearson(x, y, mask):
    """Masked Pearson correlation of x and y [B, N] over positions with mask > 0 (0 when degenerate)."""
    w = (mask > 0).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mx, my = jnp.sum(w * x) / n, jnp.sum(w * y) / n
    dx, dy = w * (x - mx), w * (y - my)
    cov, vx, vy = jnp.sum(dx * dy), jnp.sum(dx * dx), jnp.sum(dy * dy)
    r = cov / jnp.sqrt(jnp.maximum(vx * vy, 1e-30))
    return jnp.where((vx > 0) & (vy > 0), jnp.clip(r, -1.0, 1.0), 0.0)  # clip: rounding can give 1 + 1 ulp


def rl_update(params, opt_state, batch: dict, arm=0, *, graphdef, ucfg: UpdateConfig,
              alternatives: tuple = ()):
    """One rollout batch's mu minibatch updates (see the module docstring).

    batch: tokens [B, P + N] int32, start [B] int32, mask [B, N] float, sampler_logp [B, N] float32, advantages [B]
    float32, group_ids [B] int32; optionally decision [B, N] float (the task's decision points; none when absent);
    B divisible by mu.
    arm, alternatives: ``alternatives`` are UpdateConfigs that differ from ``ucfg`` only in the loss, its knobs
    (``KNOB_FIELDS``) and ``learning_rate``; all of them are compiled into this one program (``lax.switch`` over the
    distinct losses, a table of learning rates) and the traced int ``arm`` picks one: 0 is ``ucfg``, i is
    ``alternatives[i - 1]``. A grid of loss arms and learning rates then costs one compilation instead of one each.
    Returns (params, opt_state, metrics: dict of [mu] arrays, one entry per minibatch; a metric that the chosen loss
    does not produce is NaN).
    """
    TRACE_COUNTS["rl_update"] += 1
    arms = (ucfg,) + tuple(alternatives)
    arm_fields = ("loss", "learning_rate") + KNOB_FIELDS
    for other in alternatives:
        if other.replace(**{k: getattr(ucfg, k) for k in arm_fields}) != ucfg:
            raise ValueError(f"alternative {other} differs from {ucfg} in more than loss, loss knobs and "
                             f"learning_rate")
    b, n = batch["mask"].shape
    mu = ucfg.mu
    if b % mu:
        raise ValueError(f"batch of {b} rows does not split into mu={mu} minibatches")
    mask = batch["mask"].astype(jnp.float32)
    fp32_head = ucfg.fp32_head
    if ucfg.old_logp == "trainer":
        old_logp = jax.lax.stop_gradient(
            response_logprobs(graphdef, params, batch["tokens"], batch["start"], n, fp32_head=fp32_head))
    else:
        old_logp = batch["sampler_logp"].astype(jnp.float32)
    # One normaliser per rollout batch (see the module docstring), shared by every minibatch.
    batch_norm = jnp.maximum(jnp.sum(mask), 1.0) / mu
    decision = batch.get("decision")
    decision = jnp.zeros_like(mask) if decision is None else decision.astype(jnp.float32)
    data = dict(batch, mask=mask, old_logp=old_logp, decision=decision)
    minibatches = jax.tree_util.tree_map(
        lambda x: constrain(x.reshape(mu, b // mu, *x.shape[1:]), (None, "batch") + (None,) * (x.ndim - 1)), data)
    tx, lr_scale = _optimizer_and_lr_scale(arms, arm)
    # One branch per distinct loss (arms that differ only in the learning rate share it).
    losses_of_arms = [c.replace(learning_rate=arms[0].learning_rate) for c in arms]
    distinct = list(dict.fromkeys(losses_of_arms))
    branches = [_policy_loss_fn(c, batch_norm) for c in distinct]
    if len(branches) > 1:
        branches = _uniform_metrics(branches, minibatches)
        branch = jnp.asarray([distinct.index(c) for c in losses_of_arms], jnp.int32)[arm]

    def policy_fn(logp, mb):
        return branches[0](logp, mb) if len(branches) == 1 else jax.lax.switch(branch, branches, logp, mb)

    def one_update(carry, mb):
        p, s = carry
        # grad = pullback of dL/dlogp through the model: the same as value_and_grad of the composition, with the
        # per-token coefficients dL/dlogp in hand for the mechanism metrics.
        logp, pullback = jax.vjp(
            lambda q: response_logprobs(graphdef, q, mb["tokens"], mb["start"], n, fp32_head=fp32_head), p)
        (loss, metrics), coefficients = jax.value_and_grad(policy_fn, has_aux=True)(logp, mb)
        (grads,) = pullback(coefficients)
        updates, s = tx.update(grads, s, p)
        if lr_scale is not None:
            updates = jax.tree_util.tree_map(lambda u: u * lr_scale.astype(u.dtype), updates)
        p = optax.apply_updates(p, updates)
        active = mb["mask"] > 0
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       grad_share_decision=losses.gradient_share(coefficients, mb["mask"], mb["decision"]),
                       mismatch_pearson=pearson(jnp.exp(mb["sampler_logp"]), jnp.exp(logp), mb["mask"]),
                       mismatch_max_abs_logp=jnp.max(jnp.where(active, jnp.abs(logp - mb["sampler_logp"]), 0.0)))
        return (p, s), metrics

    (params, opt_state), metrics = jax.lax.scan(one_update, (params, opt_state), minibatches)
    return params, opt_state, metrics


def _optimizer_and_lr_scale(arms, arm):
    """(optimizer, traced lr factor or None) for the arms' learning rates.

    One learning rate: the arm config's own optimizer (no factor). Several: AdamW at learning rate 1, its updates
    multiplied by the selected arm's rate. That is exact because AdamW (optax.adamw: clip, Adam, decoupled weight
    decay, then the schedule) multiplies by the learning rate last, and the warm-up/constant schedule is linear in
    it; the optimizer state does not depend on the rate, so every arm starts from ``init_opt_state``.
    """
    rates = [c.learning_rate for c in arms]
    if len(set(rates)) == 1:
        return arms[0].optimizer(), None
    unit = dataclasses.replace(arms[0], learning_rate=1.0).optimizer()
    return unit, jnp.asarray(rates, jnp.float32)[arm]


def _policy_loss_fn(ucfg: UpdateConfig, batch_norm):
    """(logp [b, N], minibatch dict) -> policy_loss(...) of ucfg's loss and knobs."""
    knobs = ucfg.knobs
    if ucfg.shared_normaliser and ucfg.aggregation == "batch_token_mean":
        knobs.update(agg="const_norm", norm_constant=batch_norm)

    def fn(logp, mb):
        # group_token_mean needs the group layout; the rows of a minibatch are whole groups.
        group_knob = ({"group_ids": mb["group_ids"]}
                      if ucfg.aggregation == "group_token_mean" and "group_size" not in knobs else {})
        return losses.policy_loss(ucfg.loss, logp, mb["old_logp"], mb["advantages"], mb["mask"], **knobs,
                                  **group_knob, decision=mb["decision"])
    return fn


def _uniform_metrics(branches, minibatches):
    """Wrap loss branches so that all return the same metric keys (lax.switch needs one output structure)."""
    example = jax.tree_util.tree_map(lambda x: x[0], minibatches)
    logp = jnp.zeros(example["mask"].shape, jnp.float32)
    keys = sorted(set().union(*(jax.eval_shape(f, logp, example)[1] for f in branches)))

    def wrap(f):
        def g(logp, mb):
            loss, metrics = f(logp, mb)
            return loss, {k: jnp.asarray(metrics.get(k, jnp.nan), jnp.float32) for k in keys}
        return g
    return [wrap(f) for f in branches]


def make_rl_update(graphdef, ucfg: UpdateConfig, alternatives: tuple = ()):
    """jit(rl_update) for this model and config, with params and optimizer state donated.

    Returns ``update(params, opt_state, batch, arm=0) -> (params, opt_state, metrics)``; ``arm`` selects among
    ``(ucfg,) + alternatives`` without recompiling (see ``rl_update``). Params and optimizer state come back with the
    shardings they were passed with (the first call's; place them once, e.g. ``sharding.rules.state_shardings`` on a
    mesh, and every later call reuses the program); the metrics are replicated. Call it under ``jax.set_mesh`` when
    the arrays live on a mesh.
    """
    def fn(params, opt_state, batch, arm):
        return rl_update(params, opt_state, batch, arm, graphdef=graphdef, ucfg=ucfg, alternatives=alternatives)

    compiled = {}

    def update(params, opt_state, batch, arm=0):
        if "fn" not in compiled:
            placement = jax.tree_util.tree_map(lambda x: x.sharding, (params, opt_state))
            first = jax.tree_util.tree_leaves(placement)[0]
            replicated = (NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first)
            compiled["fn"] = jax.jit(fn, donate_argnums=(0, 1), out_shardings=(*placement, replicated))
        return compiled["fn"](params, opt_state, batch, jnp.int32(arm))
    return update


def init_opt_state(params, ucfg: UpdateConfig):
    """The optimizer state of ``params``, placed like them (its moments take their parameter's sharding)."""
    tx = ucfg.optimizer()
    abstract = jax.eval_shape(tx.init, params)
    first = jax.tree_util.tree_leaves(params)[0].sharding
    if isinstance(first, NamedSharding):
        shardings = tree_shardings_like(abstract, params, jax.tree_util.tree_map(lambda x: x.sharding, params),
                                        first.mesh)
    else:
        shardings = first
    return jax.jit(tx.init, out_shardings=shardings)(params)
