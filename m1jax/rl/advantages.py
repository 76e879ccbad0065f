"""Outcome advantages from group rewards, DAPO's overlong reward shaping, and dynamic sampling with static shapes.

Rewards come either flat, [num_groups * G] with the G responses of one prompt adjacent (the rollout layout), or as
[num_groups, G]; outputs keep the input's layout. The jnp functions are jittable (static arguments are Python values);
`select_mixed_groups` runs on the host.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

ADVANTAGE_NORMS = ("group_std", "mean_only", "batch_std", "none")


def group_advantages(rewards, group_size: int | None = None, *, norm: str = "group_std", eps: float = 1e-6,
                     ddof: int = 1):
    """Per-response advantages A_i for rewards [num_groups * G] (give group_size=G) or [num_groups, G].

    norm:
      group_std  (R_i - mean_g) / (std_g + eps)        GRPO, MiniMax-M1 Eq. 2
      mean_only  R_i - mean_g                          Dr. GRPO
      batch_std  (R_i - mean_g) / (std_batch + eps)    ScaleRL batch-level normalisation (TRL scale_rewards="batch")
      none       R_i                                   raw rewards, no baseline (plain REINFORCE)
    ddof: 1 (unbiased std, as verl, TRL and Tunix compute it) or 0. A group whose rewards are all equal gets
    advantage exactly 0 under the first three norms.
    """
    if norm not in ADVANTAGE_NORMS:
        raise ValueError(f"unknown advantage norm {norm!r}; expected one of {ADVANTAGE_NORMS}")
    grouped = _as_groups(rewards, group_size).astype(jnp.float32)
    if norm == "none":
        return jnp.reshape(grouped, jnp.shape(rewards))
    size = grouped.shape[1]
    if size - ddof < 1 and norm != "mean_only":
        raise ValueError(f"a std with ddof={ddof} needs more than {ddof} responses per group, got G={size}")
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if norm == "group_std":
        centred = centred / (jnp.std(grouped, axis=1, ddof=ddof, keepdims=True) + eps)
    elif norm == "batch_std":
        centred = centred / (jnp.std(grouped, ddof=ddof) + eps)
    return jnp.reshape(centred, jnp.shape(rewards))


def mixed_group_mask(rewards, group_size: int | None = None):
    """[num_groups] bool: True where a group's rewards are not all equal (DAPO's 0 < #correct < G filter).

    Jittable; multiply a row's loss mask by its group's entry to drop zero-variance groups without changing shapes.
    """
    grouped = _as_groups(rewards, group_size)
    return jnp.max(grouped, axis=1) > jnp.min(grouped, axis=1)


def select_mixed_groups(rewards, num_groups: int, group_size: int | None = None, *, blocks: int = 1):
    """Host-side dynamic sampling: fill a fixed-size batch of `num_groups` groups from over-sampled ones.

    Args:
      rewards: [N * G] (with group_size=G) or [N, G] numpy rewards of N >= 1 over-sampled groups (e.g. N = 2P).
      num_groups: P, the static number of groups the jitted update expects.
      blocks: the number of contiguous minibatches the update splits the P slots into (mu). The kept groups are dealt
        round-robin over the blocks (kept group j goes to block j % blocks), so when fewer than P groups are mixed
        every minibatch still gets its share of real groups; with the padding all at the end, late in training the
        last minibatches of a rollout batch would be pure padding and their optimizer steps pure momentum.

    Returns:
      (index [P] int64, weight [P] float32): index picks groups from the over-sampled ones: the first P mixed ones
      (rewards not all equal), in order within each block; weight is 1 for those and 0 for padding. Padding slots
      repeat group 0 with weight 0, so shapes stay static and the padding adds nothing to the loss (multiply the token
      mask by the weight).
    """
    grouped = np.asarray(rewards)
    grouped = grouped.reshape(-1, group_size) if group_size is not None else grouped
    if grouped.ndim != 2:
        raise ValueError(f"rewards must be [N * G] with group_size, or [N, G]; got shape {np.shape(rewards)}")
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    mixed = np.flatnonzero(grouped.max(axis=1) > grouped.min(axis=1))[:num_groups]
    # Slot s starts row s*G; the update's minibatch of that row is s * blocks // P (P need not divide by blocks).
    # Deal the kept groups over the slots in order of (position within its block, block): round-robin over blocks.
    block = np.arange(num_groups) * blocks // num_groups
    first = np.searchsorted(block, block)                 # first slot of each slot's block (block is sorted)
    slots = np.lexsort((block, np.arange(num_groups) - first))[:len(mixed)]
    index = np.zeros(num_groups, np.int64)
    weight = np.zeros(num_groups, np.float32)
    index[slots] = mixed
    weight[slots] = 1.0
    return index, weight


def overlong_penalty(lengths, max_length: int, cache_length: int, factor: float = 1.0):
    """DAPO's soft overlong punishment R_len, added to the task reward. lengths: [...] response lengths in tokens.

    R_len = 0 for |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache in between (falling linearly to -1 at
    |y| = L_max); -1 beyond L_max. All scaled by `factor`.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    excess = jnp.asarray(lengths, jnp.float32) - (max_length - cache_length)
    return factor * -jnp.clip(excess / cache_length, 0.0, 1.0)


def _as_groups(rewards, group_size):
    """rewards [N * G] with group_size=G, or [N, G] -> [N, G]."""
    rewards = jnp.asarray(rewards)
    if group_size is not None:
        if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
            raise ValueError(f"flat rewards of shape {rewards.shape} do not split into groups of {group_size}")
        return rewards.reshape(-1, group_size)
    if rewards.ndim != 2:
        raise ValueError(f"rewards of shape {rewards.shape}: pass [num_groups, G], or flat rewards with group_size")
    return rewards
