"""Expert-parallel MoE: ``jax.shard_map`` over the mesh, experts split over ``expert``, tokens moved by all-to-all.

Outside the MoE, tokens are sharded over (data, expert[, sequence]) like any activation. Inside, each device
(1) takes its local token-expert assignments, (2) packs them into a send buffer ``[EP, C, D]`` by destination shard
(the shard owning the expert), (3) exchanges it with ``jax.lax.all_to_all`` over ``expert``, (4) runs the grouped
matmuls over its ``E / EP`` local experts, (5) sends the results back with the inverse all-to-all and (6) combines
them with the routing weights at the sending device.

Transport: the padded all-to-all with a capacity buffer ``C`` per (source, destination) pair works on every backend
(``jax.lax.ragged_all_to_all`` is unimplemented on XLA:CPU). Dropless (default, ``capacity_factor=None``) takes the
worst case ``C = n_local * min(k, E_local)``; a ``capacity_factor`` c gives ``C = ceil(c * n_local * k / EP)`` and
drops the assignments past it (their contribution is zero, as in Switch/GShard token dropping).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_to_mesh_spec

EXPERT_AXIS = "expert"


def capacity(n_local: int, k: int, num_experts: int, ep: int, capacity_factor: float | None) -> int:
    """Rows each device reserves per destination shard in the all-to-all buffer."""
    local_experts = num_experts // ep
    worst = n_local * min(k, local_experts)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * n_local * k / ep)))


def _pack(dest: jax.Array, ep: int, cap: int):
    """dest [S] destination shard of each assignment -> (position in its destination's buffer [S], kept [S])."""
    one_hot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)                    # [S, EP]
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)  # rank among same-destination slots
    return position, position < cap


def _local_experts(rows, local_expert, valid, w1, w3, w2, swiglu, grouped_matmul):
    """rows [R, D] with local expert ids [R] (valid [R]) -> [R, D] fp32 expert outputs (zeros where not valid)."""
    num_local = w1.shape[0]
    key = jnp.where(valid, local_expert, num_local)            # invalid rows sort last, outside every group
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = jnp.take(rows, order, axis=0)
    gate = grouped_matmul(xs, w1, group_sizes)
    up = grouped_matmul(xs, w3, group_sizes)
    ys = grouped_matmul(swiglu(gate, up).astype(rows.dtype), w2, group_sizes)
    return jnp.zeros_like(ys).at[order].set(ys)


def _moe_shard(x, weights, experts, w1, w3, w2, *, ep, cap, swiglu, grouped_matmul):
    """Per device: x [n, D], weights/experts [n, k], w* [E/EP, ...] local experts -> [n, D] fp32."""
    n, k = experts.shape
    d = x.shape[1]
    num_local = w1.shape[0]
    flat = experts.reshape(-1)                                  # [S = n*k]
    dest, local_expert = flat // num_local, flat % num_local
    position, kept = _pack(dest, ep, cap)
    slot = jnp.where(kept, dest * cap + position, ep * cap)     # dropped -> out of bounds, discarded by mode="drop"
    tokens = jnp.repeat(x, k, axis=0)
    send = jnp.zeros((ep * cap, d), x.dtype).at[slot].set(tokens, mode="drop")
    send_expert = jnp.zeros((ep * cap,), jnp.int32).at[slot].set(local_expert, mode="drop")
    send_valid = jnp.zeros((ep * cap,), bool).at[slot].set(True, mode="drop")

    def exchange(a):  # [EP*cap, ...]: block j goes to shard j; block j received came from shard j
        return a if ep == 1 else jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)

    out = _local_experts(exchange(send), exchange(send_expert), exchange(send_valid), w1, w3, w2, swiglu,
                         grouped_matmul)
    back = exchange(out)                                        # [EP*cap, D] fp32, in send order
    y_slots = jnp.take(back, jnp.minimum(slot, ep * cap - 1), axis=0) * kept[:, None]
    return jnp.einsum("nkd,nk->nd", y_slots.reshape(n, k, d), weights.astype(jnp.float32))


def moe_expert_parallel(x, weights, experts, w1, w3, w2, *, swiglu, grouped_matmul, capacity_factor=None):
    """x [N, D]; weights, experts [N, k]; w1/w3 [E, D, F]; w2 [E, F, D] -> [N, D] fp32 (== moe_dense when dropless).

    Runs under the mesh set by ``jax.set_mesh`` (axis ``expert`` of size EP dividing E); without one, or with
    EP == 1, the same code runs on one shard. Token rows are split over every mesh axis that the rules give
    "batch" and "length" (N = B*T flattened, batch-major), experts over ``expert``; the expert hidden dim is
    gathered (tensor parallelism inside the experts is not done here).
    """
    mesh = jax.sharding.get_abstract_mesh()
    num_experts = w1.shape[0]
    ep = 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes)).get(EXPERT_AXIS, 1)
    if num_experts % ep:
        raise ValueError(f"expert parallelism needs num_experts={num_experts} divisible by expert={ep}")
    n, k = experts.shape
    if mesh.empty:
        return _moe_shard(x, weights, experts, w1, w3, w2, ep=1, cap=capacity(n, k, num_experts, 1, capacity_factor),
                          swiglu=swiglu, grouped_matmul=grouped_matmul)
    rows = logical_to_mesh_spec((("batch", "length"),), shape=(n,), mesh=mesh)  # N = B*T rows, batch-major
    shards = math.prod(mesh.shape[a] for a in _axes(rows[0]))
    cap = capacity(n // shards, k, num_experts, ep, capacity_factor)
    w_spec = P(EXPERT_AXIS if ep > 1 else None)
    body = functools.partial(_moe_shard, ep=ep, cap=cap, swiglu=swiglu, grouped_matmul=grouped_matmul)
    return jax.shard_map(body, in_specs=(rows, rows, rows, w_spec, w_spec, w_spec), out_specs=rows,
                         check_vma=False)(x, weights, experts, w1, w3, w2)


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
