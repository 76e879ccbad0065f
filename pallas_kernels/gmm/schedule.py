"""Which row tiles each group touches: the work list of the grouped-matmul kernels (pure JAX, static shapes).

The rows of ``lhs [M, K]`` are sorted by group, so group ``g`` owns rows ``offsets[g] .. offsets[g+1]`` and a
row tile of ``block_m`` rows can straddle several groups. The forward kernel visits each (group, row tile) pair
that overlaps and writes only that group's rows of the tile, so every visit's store is disjoint from the others
and the visits can run in parallel. Rows past ``sum(group_sizes)`` form one extra segment whose visits write zeros,
so every output row is written exactly once and the output needs no zero-initialisation pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Columns of the visit table.
GROUP, ROW_TILE, ROW_LO, ROW_HI = range(4)


def _inclusive_cumsum(x: jax.Array) -> jax.Array:
    """[n] -> [n] running sum as one masked reduction: ``jnp.cumsum`` becomes a scan that XLA may run as a
    while loop, and on GPU each while iteration waits on a device-to-host copy; n (groups) is small."""
    idx = jnp.arange(x.shape[0])
    return jnp.sum(jnp.where(idx[None, :] <= idx[:, None], x[None, :], 0), axis=1, dtype=x.dtype)


def group_offsets(group_sizes: jax.Array, num_rows: int) -> jax.Array:
    """[G] sizes -> [G+1] int32 row offsets, clamped to ``num_rows`` so that no kernel reads past lhs."""
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(_inclusive_cumsum(sizes), num_rows)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def max_row_tile_visits(num_rows: int, num_groups: int, block_m: int) -> int:
    """Static bound on the visit count: G+1 contiguous segments cross at most G tile boundaries."""
    return -(-num_rows // block_m) + num_groups


def row_tile_visits(group_sizes: jax.Array, num_rows: int, block_m: int) -> jax.Array:
    """Returns the int32 visit table ``[V, 4]`` = (group, row_tile, row_lo, row_hi), V = ``max_row_tile_visits``.

    group is in ``0..G-1`` for a real group, ``G`` for the zero-fill segment of rows past the last group, and
    ``-1`` for an unused slot (whose row range is empty). Visits are ordered by segment, then row tile.
    """
    num_groups = group_sizes.shape[0]
    offsets = group_offsets(group_sizes, num_rows)
    starts = offsets                                                         # [G+1]: G groups + the zero tail
    ends = jnp.concatenate([offsets[1:], jnp.full((1,), num_rows, jnp.int32)])
    first_tile = starts // block_m
    count = jnp.where(ends > starts, (ends - 1) // block_m - first_tile + 1, 0)
    cum_count = _inclusive_cumsum(count)
    visit = jnp.arange(max_row_tile_visits(num_rows, num_groups, block_m), dtype=jnp.int32)
    # compare_all: no while loop either; V x (G+1) compares.
    segment = jnp.searchsorted(cum_count, visit, side="right", method="compare_all").astype(jnp.int32)
    valid = segment <= num_groups
    seg = jnp.minimum(segment, num_groups)
    tile = first_tile[seg] + visit - (cum_count[seg] - count[seg])
    return jnp.stack([
        jnp.where(valid, seg, -1),
        jnp.where(valid, tile, 0),
        jnp.where(valid, starts[seg], 0),
        jnp.where(valid, ends[seg], 0),
    ], axis=1).astype(jnp.int32)
