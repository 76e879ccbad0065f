"""From a scored rollout to the update batch: group selection (DAPO's dynamic sampling), advantages, and the gather
of the selected rows on device (phase 2 of the RL step, docs/rl.md).

``select_groups`` runs on the host over the rewards of all rows (tiny; every process computes the same selection);
``gather_update_batch`` then picks the selected rows out of the rollout on device, so responses never travel to the
host and back.
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from m1jax import generate
from m1jax.rl.advantages import group_advantages, select_mixed_groups
from m1jax.rl.rollout import Rollout
from sharding.rules import constrain

# Python-side trace counts of the jitted gather (incremented only while tracing): the no-recompilation test reads it.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Selection:
    """The rows of one update batch of B = P * G rows (numpy; group-major: the G rows of slot j are j*G .. j*G+G-1).

    rows [B] int64: the rollout rows; weight [B] float32: 1 for the rows of kept groups, 0 for padding (their loss
    mask is zero); advantages [B] float32 (0 on padding); group_ids [B] int32 (the slot j); rewards [B] float32
    (host-side, for logging).
    """
    rows: np.ndarray
    weight: np.ndarray
    advantages: np.ndarray
    group_ids: np.ndarray
    rewards: np.ndarray


def select_groups(rewards: np.ndarray, *, group_size: int, num_groups: int, adv_norm: str = "group_std",
                  dynamic_sampling: bool = False, minibatches: int = 1) -> tuple[Selection, dict]:
    """Group selection and advantages for a rollout of N >= num_groups groups.

    Args:
      rewards: [N * G] float rewards of the rollout rows (the G rows of group i adjacent).
      num_groups: P, the static number of groups of the update batch.
      dynamic_sampling: DAPO's filter: keep the first P groups whose rewards are not all equal, padding with
        zero-weight rows and dealing the kept groups round-robin over the ``minibatches`` row blocks
        (``select_mixed_groups``); otherwise the first P groups, zero-variance ones included.
      adv_norm: ``group_advantages``' norm, computed over the kept groups only (padding takes no part in a batch
        std and gets advantage 0).
    Returns (Selection of P * G rows, stats: reward_mean over all N groups, mixed_frac, kept_groups).
    """
    rewards = np.asarray(rewards, np.float32)
    g = group_size
    if rewards.ndim != 1 or rewards.size % g or rewards.size // g < num_groups:
        raise ValueError(f"expected rewards of >= {num_groups} groups of {g} rows, got shape {rewards.shape}")
    grouped = rewards.reshape(-1, g)
    mixed = grouped.max(axis=1) > grouped.min(axis=1)
    if dynamic_sampling:
        index, weight = select_mixed_groups(grouped, num_groups, blocks=minibatches)
    else:
        index, weight = np.arange(num_groups), np.ones(num_groups, np.float32)
    kept = weight > 0
    advantages = np.zeros((num_groups, g), np.float32)
    if kept.any():
        advantages[kept] = np.asarray(group_advantages(grouped[index[kept]], norm=adv_norm))
    selection = Selection(rows=(index[:, None] * g + np.arange(g)[None, :]).reshape(-1),
                          weight=np.repeat(weight, g).astype(np.float32), advantages=advantages.reshape(-1),
                          group_ids=np.repeat(np.arange(num_groups, dtype=np.int32), g),
                          rewards=grouped[index].reshape(-1))
    stats = {"reward_mean": float(rewards.mean()), "mixed_frac": float(mixed.mean()), "kept_groups": float(kept.sum())}
    return selection, stats


def rollout_stats(lengths: np.ndarray, stop_reason: np.ndarray) -> dict:
    """truncated_frac (M1's repetition truncation), mean_length and rollout_tokens of all rollout rows."""
    return {"truncated_frac": float(np.mean(stop_reason == generate.TRUNCATED)),
            "mean_length": float(np.mean(lengths)), "rollout_tokens": int(np.sum(lengths))}


@jax.jit
def _gather(rollout: Rollout, rows, weight, advantages, group_ids, decision):
    TRACE_COUNTS["gather"] += 1
    rows_2d, rows_1d = ("batch", None), ("batch",)
    batch = {"tokens": constrain(rollout.tokens[rows], rows_2d),
             "start": constrain(rollout.start[rows], rows_1d),
             "mask": constrain(rollout.response_mask[rows] * weight[:, None], rows_2d),
             "sampler_logp": constrain(rollout.sampler_logp[rows], rows_2d),
             "advantages": constrain(advantages, rows_1d),
             "group_ids": constrain(group_ids, rows_1d)}
    if decision is not None:
        batch["decision"] = constrain(decision[rows] * rollout.response_mask[rows], rows_2d)
    return batch


def gather_update_batch(rollout: Rollout, selection: Selection, put=jnp.asarray,
                        decision: np.ndarray | None = None) -> dict[str, jax.Array]:
    """The update batch (``m1jax.rl.step.rl_update``'s input) of the selected rows, gathered on device.

    Returns {tokens [B, P + N] int32, start [B] int32, mask [B, N] float32 (response tokens x row weight),
    sampler_logp [B, N] float32, advantages [B] float32, group_ids [B] int32}, split over the mesh's batch axes when
    called under ``jax.set_mesh``; with ``decision`` (the task's decision points of every rollout row, [R, N] host
    array) also decision [B, N] float32 (on response tokens only). ``put`` places the selection's host vectors
    (replicated on a mesh: ``Placement.replicated``).
    """
    return _gather(rollout, put(selection.rows.astype(np.int32)), put(selection.weight), put(selection.advantages),
                   put(selection.group_ids), None if decision is None else put(np.asarray(decision, np.float32)))
