"""Token-level policy-gradient losses: CISPO (MiniMax-M1), its masked form, PPO-clip, GRPO, DAPO and Dr. GRPO.

Every objective J (docs/rl.md) is maximised; `policy_loss` returns L = -J. All losses share one
surrogate per token and differ in three things: the token coefficient (clipped IS weight under a stop-gradient for the
CISPO family, PPO's min(r A, clip(r) A) otherwise), the trust-region knobs, and the default aggregation.

Gradient facts the tests check, per token as coefficient x grad(logp):
  cispo          sg(r_hat) A            for every token (r_hat = r clipped to [ratio_min, ratio_max])
  cispo_masked   sg(r_hat) A M          M = 0 where PPO's trust region is clipped-active (M1 Eq. 7)
  ppo-family     r A M                  (the unclipped r), optionally bounded by dual clip for A < 0

Aggregation (the normaliser N of the token sum; empty samples/groups, i.e. zero total mask weight, are not counted):
  batch_token_mean  sum over all tokens / total mask weight (verl `token-mean`, TRL `dapo`/`cispo`)
  group_token_mean  per group sum / group mask weight, then mean over groups (M1 Eq. 4, ScaleRL "prompt-level")
  sample_mean       per sample mean over its tokens, then mean over samples (GRPO, PPO's 1/|o_i|)
  const_norm        sum over all tokens / a constant (Dr. GRPO); the constant defaults to batch * length, i.e.
                    #sequences x max_new_tokens when arrays are padded to the generation limit

Project decision (implementations differ here): CISPO and DAPO default to `batch_token_mean`, which needs no group layout
and matches verl/TRL; M1's own per-group normalisation is `agg="group_token_mean"`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

LOSSES = ("cispo", "cispo_masked", "ppo", "grpo", "dapo", "drgrpo")
AGGREGATIONS = ("group_token_mean", "batch_token_mean", "sample_mean", "const_norm")

_CISPO_FAMILY = ("cispo", "cispo_masked")
_PPO_FAMILY = ("ppo", "grpo", "dapo", "drgrpo")

# Per-loss defaults. `eps_low`/`eps_high` are PPO's trust region (cispo_masked uses it for its mask M).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "cispo": dict(agg="batch_token_mean", ratio_max=5.0),
    "cispo_masked": dict(agg="batch_token_mean", ratio_max=5.0, eps_low=0.2, eps_high=0.28),
    "ppo": dict(agg="sample_mean", eps_low=0.2, eps_high=0.2),
    "grpo": dict(agg="sample_mean", eps_low=0.2, eps_high=0.2),
    "dapo": dict(agg="batch_token_mean", eps_low=0.2, eps_high=0.28),
    "drgrpo": dict(agg="const_norm", eps_low=0.2, eps_high=0.2),
}

# Knobs accepted by every loss; the rest are family-specific.
_COMMON_KNOBS = ("agg", "group_size", "group_ids", "norm_constant", "kl_beta", "ref_logp", "entropy", "decision")
_FAMILY_KNOBS = {
    "cispo": ("ratio_max", "eps_is_high", "ratio_min"),
    "cispo_masked": ("ratio_max", "eps_is_high", "ratio_min", "eps_low", "eps_high"),
    **{name: ("eps_low", "eps_high", "dual_clip") for name in _PPO_FAMILY},
}

# exp() of a log-ratio beyond this overflows fp32 or is meaningless; Tunix clips at the same value.
_LOG_RATIO_LIMIT = 20.0


def default_knobs(name: str) -> dict[str, Any]:
    """The per-loss defaults (aggregation, clip ranges, caps) that ``policy_loss`` applies when a knob is not given."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown policy loss {name!r}; choose from {sorted(_DEFAULTS)}")
    return dict(_DEFAULTS[name])


def check_knobs(name: str, knobs: dict[str, Any]) -> None:
    """Raise ValueError, as ``policy_loss`` would, if the static knobs (caps, clip ranges, aggregation) are unknown
    for the loss or contradictory. The group layout of ``group_token_mean`` is data and is not checked here."""
    knobs = dict(knobs)
    if knobs.get("agg", _DEFAULTS.get(name, {}).get("agg")) == "group_token_mean":
        knobs.setdefault("group_size", 1)
    _resolve_knobs(name, knobs)


def policy_loss(name: str, logp, old_logp, advantages, mask, **knobs):
    """Policy loss L = -J for one minibatch.

    Args:
      name: one of LOSSES.
      logp: [batch, length] float, log pi_theta of the sampled tokens (differentiated).
      old_logp: [batch, length] float, log pi_old of the same tokens (data; no gradient flows into it).
      advantages: [batch] (outcome level) or [batch, length] float.
      mask: [batch, length] bool or float token weights (0 for prompt/padding; float weights let dynamic sampling
        zero out whole rows without changing shapes). Values at masked positions are ignored, -inf/NaN included.
      **knobs (static Python values unless marked array):
        agg: one of AGGREGATIONS (per-loss default, see module docstring).
        group_size: int G for agg="group_token_mean" (rows i*G..i*G+G-1 form a group); or
        group_ids: [batch] int array naming each row's group (any labels), instead of group_size.
        norm_constant: normaliser for agg="const_norm" (default batch * length): a Python float, or a scalar array
          such as the whole rollout batch's token count / mu, so that every minibatch of one rollout batch shares
          one normaliser instead of silently re-normalising per minibatch.
        ratio_max: absolute cap on the CISPO IS weight (default 5.0; None disables the cap).
        eps_is_high: M1-style cap 1 + eps_is_high instead of ratio_max (give at most one of the two).
        ratio_min: lower bound on the CISPO IS weight (default None = no bound; 0 also means none).
        eps_low, eps_high: PPO trust region [1 - eps_low, 1 + eps_high] (ppo/grpo/drgrpo 0.2/0.2,
          dapo and cispo_masked 0.2/0.28).
        dual_clip: c > 1; bounds the A < 0 surrogate below at c * A (PPO family only; default off).
        kl_beta: weight of the k3 KL penalty towards ref_logp (default 0).
        ref_logp: [batch, length] array, log pi_ref, required when kl_beta > 0.
        entropy: [batch, length] array, per-token policy entropy, for the `entropy` metric only.
        decision: [batch, length] bool/float array, the task's decision points (fork tokens), for metrics only.

    Returns:
      (loss scalar float32, metrics dict of scalars). Metrics: ratio_mean/max/min (unclipped r over active tokens),
      approx_kl (k3 estimate of KL(pi_old || pi_theta)), entropy (masked mean of the given per-token entropy, else of
      -logp, the sampled-token estimate), num_tokens; CISPO family: is_cap_frac (tokens whose weight was clipped),
      is_weight_mean; PPO family and cispo_masked: ppo_clip_frac (tokens with M = 0); with dual_clip: dual_clip_frac;
      with ref_logp: kl_ref; pg_loss and kl_loss (the two terms of the loss). Plain cispo also reports
      trust_region_frac: the tokens DAPO's mask (eps 0.2/0.28) would drop, which CISPO keeps. With ``decision``:
      decision_frac (share of the active tokens that are decision points) and every clip fraction restricted to
      the decision points, as ``<name>_decision``.
    """
    k = _resolve_knobs(name, knobs)
    logp, old_logp, advantages, mask = _check_arrays(logp, old_logp, advantages, mask, k)
    agg_kwargs = dict(group_ids=k["group_ids"], norm_constant=k["norm_constant"])
    # Padded positions may hold -inf or garbage log-probs; neutral values there keep NaNs out of the gradient too
    # (a masked-out NaN still poisons the backward pass through 0 * NaN).
    logp, old_logp = (_fill_masked(x, mask) for x in (logp, old_logp))
    for key in ("ref_logp", "entropy"):
        if k[key] is not None:
            k[key] = _fill_masked(k[key], mask)
    # Token masks whose share of the active tokens is reported overall and (with ``decision``) at decision points.
    fractions = {}

    log_ratio = jnp.clip(logp - jax.lax.stop_gradient(old_logp), -_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = jnp.exp(log_ratio)
    metrics = {}

    if name in _CISPO_FAMILY:
        weight = jax.lax.stop_gradient(jnp.clip(ratio, k["ratio_min"], k["ratio_max"]))
        objective = weight * advantages * logp
        fractions["is_cap_frac"] = weight != jax.lax.stop_gradient(ratio)
        metrics["is_weight_mean"] = masked_mean(weight, mask)
        if name == "cispo_masked":
            keep = ~_ppo_clipped_active(ratio, advantages, k["eps_low"], k["eps_high"])
            objective = objective * jax.lax.stop_gradient(keep.astype(objective.dtype))
            fractions["ppo_clip_frac"] = ~keep
        else:
            dapo = _DEFAULTS["dapo"]
            fractions["trust_region_frac"] = _ppo_clipped_active(ratio, advantages, dapo["eps_low"],
                                                                 dapo["eps_high"])
    else:
        unclipped = ratio * advantages
        clipped = jnp.clip(ratio, 1.0 - k["eps_low"], 1.0 + k["eps_high"]) * advantages
        objective = jnp.minimum(unclipped, clipped)
        fractions["ppo_clip_frac"] = _ppo_clipped_active(ratio, advantages, k["eps_low"], k["eps_high"])
        if k["dual_clip"] is not None:
            floor = k["dual_clip"] * advantages
            fractions["dual_clip_frac"] = (advantages < 0) & (objective < floor)
            objective = jnp.where(advantages < 0, jnp.maximum(objective, floor), objective)
    for key, tokens in fractions.items():
        metrics[key] = masked_mean(tokens, mask)
    if k["decision"] is not None:
        at_decisions = mask * (k["decision"] > 0)
        metrics["decision_frac"] = masked_mean(k["decision"] > 0, mask)
        for key, tokens in fractions.items():  # NaN without decision tokens: nothing to measure
            metrics[key + "_decision"] = jnp.where(jnp.sum(at_decisions) > 0, masked_mean(tokens, at_decisions),
                                                   jnp.nan)

    pg_loss = -aggregate(objective, mask, k["agg"], **agg_kwargs)
    loss = pg_loss
    kl_loss = jnp.zeros((), jnp.float32)
    if k["ref_logp"] is not None:
        kl_ref = k3_kl(logp, k["ref_logp"])
        metrics["kl_ref"] = masked_mean(jax.lax.stop_gradient(kl_ref), mask)
        if k["kl_beta"] > 0:
            kl_loss = k["kl_beta"] * aggregate(kl_ref, mask, k["agg"], **agg_kwargs)
            loss = loss + kl_loss

    sg_ratio = jax.lax.stop_gradient(ratio)
    active = mask > 0
    metrics.update(
        pg_loss=jax.lax.stop_gradient(pg_loss),
        kl_loss=jax.lax.stop_gradient(kl_loss),
        ratio_mean=masked_mean(sg_ratio, mask),
        ratio_max=jnp.max(jnp.where(active, sg_ratio, -jnp.inf)),
        ratio_min=jnp.min(jnp.where(active, sg_ratio, jnp.inf)),
        # Tokens were sampled from pi_old, so k3 with the roles swapped: r - 1 - log r.
        approx_kl=masked_mean(k3_kl(old_logp, jax.lax.stop_gradient(logp)), mask),
        entropy=masked_mean(jax.lax.stop_gradient(-logp if k["entropy"] is None else k["entropy"]), mask),
        num_tokens=jnp.sum(mask),
    )
    return loss.astype(jnp.float32), metrics


def token_coefficients(name: str, logp, old_logp, advantages, mask, **knobs):
    """dL/d(logp) [batch, length] of ``policy_loss``: each token's gradient coefficient (the loss's gradient with
    respect to the parameters is the sum of these times grad logp). Zero where a token passes no gradient (masked,
    or dropped by PPO's clip)."""
    return jax.grad(lambda x: policy_loss(name, x, old_logp, advantages, mask, **knobs)[0])(
        jnp.asarray(logp, jnp.float32))


def gradient_share(coefficients, mask, decision):
    """Share of the gradient carried by the decision points: sum of |dL/dlogp| over active decision tokens / sum
    over all active tokens (NaN when no token has a gradient). Shapes [batch, length]."""
    magnitude = jnp.where(mask > 0, jnp.abs(coefficients), 0.0)
    total = jnp.sum(magnitude)
    return jnp.where(total > 0, jnp.sum(magnitude * (decision > 0)) / _nonzero(total), jnp.nan)


def aggregate(values, mask, agg: str, *, group_ids=None, norm_constant=None):
    """Reduce per-token values [batch, length] to a scalar with mask weights [batch, length] (see module docstring).

    group_ids: [batch] int, required for agg="group_token_mean". norm_constant: float or scalar array for
    agg="const_norm" (None = batch * length). Samples or groups with zero mask weight are left out of the means.
    """
    mask = mask.astype(values.dtype)
    # where() rather than a product so that non-finite values at masked positions (e.g. padded logp) stay out.
    weighted = jnp.where(mask > 0, values * mask, 0.0)
    if agg == "batch_token_mean":
        return jnp.sum(weighted) / _nonzero(jnp.sum(mask))
    if agg == "const_norm":
        constant = values.shape[0] * values.shape[1] if norm_constant is None else norm_constant
        return jnp.sum(weighted) / constant
    row_sum, row_weight = jnp.sum(weighted, axis=1), jnp.sum(mask, axis=1)
    if agg == "sample_mean":
        present = row_weight > 0
        return jnp.sum(jnp.where(present, row_sum / _nonzero(row_weight), 0.0)) / _nonzero(jnp.sum(present))
    if agg == "group_token_mean":
        # same[i, j]: rows i and j share a group. Works for traced ids, which segment_sum would need a static
        # group count for; batch is small enough that the [batch, batch] matrix is free.
        same = (group_ids[:, None] == group_ids[None, :]).astype(values.dtype)
        group_sum, group_weight, group_rows = same @ row_sum, same @ row_weight, jnp.sum(same, axis=1)
        # Each group's value is counted once per row, so weight rows by 1 / rows-in-group.
        present = group_weight > 0
        per_row = jnp.where(present, group_sum / _nonzero(group_weight), 0.0) / group_rows
        num_groups = jnp.sum(jnp.where(present, 1.0 / group_rows, 0.0))
        return jnp.sum(per_row) / _nonzero(num_groups)
    raise ValueError(f"unknown aggregation {agg!r}; expected one of {AGGREGATIONS}")


def masked_mean(values, mask):
    """Mean of values [batch, length] under mask weights [batch, length] (0 when the mask is empty)."""
    return aggregate(values.astype(jnp.float32), mask, "batch_token_mean")


def k3_kl(logp, ref_logp):
    """Per-token k3 estimator of KL(pi || pi_ref) from samples of pi: exp(d) - d - 1 with d = ref_logp - logp.

    Non-negative and unbiased (Schulman's k3, GRPO's KL term). Shapes: [batch, length] -> [batch, length].
    """
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def _ppo_clipped_active(ratio, advantages, eps_low, eps_high):
    """Tokens where PPO's min(r A, clip(r) A) takes the clipped branch and so passes no gradient (M1 Eq. 7)."""
    return ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))


def _fill_masked(x, mask):
    return jnp.where(mask > 0, x, jnp.zeros_like(x))


def _nonzero(x):
    return jnp.where(x > 0, x, 1.0)


def _resolve_knobs(name: str, knobs: dict) -> dict:
    """Merge per-loss defaults with the given knobs; raise ValueError on unknown or contradictory ones."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")
    allowed = _COMMON_KNOBS + _FAMILY_KNOBS[name]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise ValueError(f"loss {name!r} does not take knob(s) {unknown}; it accepts {sorted(allowed)}")
    if "ratio_max" in knobs and "eps_is_high" in knobs:
        raise ValueError("give either ratio_max (absolute cap) or eps_is_high (cap 1 + eps_is_high), not both")

    k = dict.fromkeys(("group_size", "group_ids", "norm_constant", "ref_logp", "entropy", "decision", "dual_clip",
                       "ratio_min", "eps_low", "eps_high", "ratio_max"))
    k.update(kl_beta=0.0)
    k.update(_DEFAULTS[name])
    k.update(knobs)
    if knobs.get("eps_is_high") is not None:
        if knobs["eps_is_high"] <= 0:
            raise ValueError(f"eps_is_high must be > 0, got {knobs['eps_is_high']}")
        k["ratio_max"] = 1.0 + knobs["eps_is_high"]
    k.pop("eps_is_high", None)

    if k["agg"] not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {k['agg']!r}; expected one of {AGGREGATIONS}")
    if name in _CISPO_FAMILY:
        if k["ratio_min"] is not None and k["ratio_min"] < 0:
            raise ValueError(f"ratio_min must be >= 0 (0 or None means no lower bound), got {k['ratio_min']}")
        if k["ratio_min"] == 0:
            k["ratio_min"] = None
        if k["ratio_max"] is not None and k["ratio_max"] <= 0:
            raise ValueError(f"the IS cap must be > 0, got ratio_max={k['ratio_max']}")
        if None not in (k["ratio_min"], k["ratio_max"]) and k["ratio_min"] >= k["ratio_max"]:
            raise ValueError(f"ratio_min={k['ratio_min']} must be below the cap ratio_max={k['ratio_max']}")
    if "eps_low" in _FAMILY_KNOBS[name]:
        for key in ("eps_low", "eps_high"):
            if not k[key] >= 0:
                raise ValueError(f"{key} must be >= 0, got {k[key]}")
    if k["dual_clip"] is not None and not k["dual_clip"] > 1:
        raise ValueError(f"dual_clip must be > 1 (it bounds r below 1 + eps otherwise), got {k['dual_clip']}")
    if k["kl_beta"] < 0:
        raise ValueError(f"kl_beta must be >= 0, got {k['kl_beta']}")
    if k["kl_beta"] > 0 and k["ref_logp"] is None:
        raise ValueError("kl_beta > 0 needs ref_logp (the reference policy's log-probs)")

    if k["agg"] == "group_token_mean":
        if (k["group_size"] is None) == (k["group_ids"] is None):
            raise ValueError("agg='group_token_mean' needs exactly one of group_size or group_ids")
    elif k["group_size"] is not None or k["group_ids"] is not None:
        raise ValueError(f"group_size/group_ids only apply to agg='group_token_mean', not agg={k['agg']!r}")
    if k["norm_constant"] is not None:
        if k["agg"] != "const_norm":
            raise ValueError(f"norm_constant only applies to agg='const_norm', not agg={k['agg']!r}")
        # Array constants (possibly traced) are data and cannot be checked here.
        if isinstance(k["norm_constant"], (int, float)) and not (k["norm_constant"] > 0
                                                                  and math.isfinite(k["norm_constant"])):
            raise ValueError(f"norm_constant must be a finite positive number, got {k['norm_constant']}")
    return k


def _check_arrays(logp, old_logp, advantages, mask, k):
    """Shape checks; returns float logp/old_logp, advantages broadcast to [batch, length], mask."""
    logp, old_logp, advantages, mask = map(jnp.asarray, (logp, old_logp, advantages, mask))
    if logp.ndim != 2:
        raise ValueError(f"logp must be [batch, length], got shape {logp.shape}")
    shape = logp.shape
    for label, x in (("old_logp", old_logp), ("mask", mask), ("ref_logp", k["ref_logp"]),
                     ("entropy", k["entropy"]), ("decision", k["decision"])):
        if x is not None and jnp.shape(x) != shape:
            raise ValueError(f"{label} has shape {jnp.shape(x)}, expected {shape} like logp")
    if not jnp.issubdtype(logp.dtype, jnp.floating):
        raise ValueError(f"logp must be floating point, got {logp.dtype}")
    if advantages.shape == shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != shape:
        raise ValueError(f"advantages has shape {advantages.shape}, expected [batch]={shape[:1]} or {shape}")
    advantages = jax.lax.stop_gradient(advantages.astype(logp.dtype))

    batch = shape[0]
    if k["group_size"] is not None:
        g = k["group_size"]
        if not (isinstance(g, int) and g > 0 and batch % g == 0):
            raise ValueError(f"group_size must be a positive int dividing batch={batch}, got {g!r}")
        k["group_ids"] = jnp.arange(batch) // g
    elif k["group_ids"] is not None:
        k["group_ids"] = jnp.asarray(k["group_ids"])
        if k["group_ids"].shape != (batch,):
            raise ValueError(f"group_ids has shape {k['group_ids'].shape}, expected [batch]=({batch},)")
    if k["ref_logp"] is not None:
        k["ref_logp"] = jax.lax.stop_gradient(jnp.asarray(k["ref_logp"], logp.dtype))
    if k["decision"] is not None:
        k["decision"] = jnp.asarray(k["decision"])
    return logp, old_logp.astype(logp.dtype), advantages, mask.astype(logp.dtype)
