"""Expert-parallel MoE: ``jax.shard_map`` over the mesh, experts split over ``expert``, tokens moved by all-to-all.

Outside the MoE, tokens are sharded over (data, expert[, sequence]) like any activation. Inside, each device
(1) takes its local token-expert assignments and decides which ones it keeps (all of them when dropless), (2) sends
each kept assignment's token row to the shard owning its expert, (3) runs the grouped matmuls over its ``E / EP``
local experts, (4) sends the results back and (5) combines them with the routing weights at the sending device.
Steps (1) and (5) are shared; steps (2)-(4) depend on the transport:

* ``"padded"``: a send buffer ``[EP, C, D]`` by destination shard (``C`` rows reserved per (source, destination)
  pair), exchanged with ``jax.lax.all_to_all``; the receiver sorts the ``EP * C`` rows by local expert. Works on every
  backend, but moves ``EP * C`` rows each way whatever the routing.
* ``"ragged"``: the kept assignments sorted by global expert (so by destination, then local expert) and sent with
  ``jax.lax.ragged_all_to_all`` with exact per-(destination, local expert) sizes; the per-expert counts of every shard
  are all-gathered first (``[EP, E]`` ints) so that each device computes the same offsets (``ragged_plan``). The
  receive buffer is still statically ``EP * C`` rows, but it arrives grouped by local expert (no receive-side sort)
  and only the real rows travel. XLA:CPU has no ``ragged_all_to_all``: there ``ragged_all_to_all_emulated`` (same
  arguments, built from ``all_gather``) stands in, so the plumbing is testable on fake CPU devices.

Default (``transport=None``): padded on every backend. Measured on 2 H100s (expert=2, MoE layer fwd+bwd, 32768
tokens, D = F = 2048, 8 experts, top-2, bf16; benchmarks/RESULTS.md): ragged 34.0 ms against padded 12.7 ms dropless
(33.4 vs 10.2 at capacity factor 1.25), with equal outputs, so XLA's GPU ragged_all_to_all (several segments per
peer) costs more than the rows it saves at EP = 2. ``DEFAULT_TRANSPORT`` is the one place to change once ragged is
measured faster (larger EP, TPU). Gradients: jax 0.11.2 defines the transpose of ``ragged_all_to_all`` (the reverse
exchange), so autodiff handles the native path; the emulation is differentiated through ``all_gather``.

Capacity: dropless (default, ``capacity_factor=None``) takes the worst case ``C = n_local * min(k, E_local)``; a
``capacity_factor`` c gives ``C = ceil(c * n_local * k / EP)`` and drops, per (source, destination shard), the
assignments past the first ``C`` in token order (their contribution is zero, as in Switch/GShard token dropping).
Both transports drop the same assignments, so they compute the same function.

Expert weights enter the shard_map as they are placed (``sharding.rules.param_spec``): experts over ``expert`` and,
under ``fsdp_params()``, the embed dim over the FSDP axes (and the hidden dim over ``tensor`` when it has one). Each
device all-gathers its local experts' whole weights inside (bf16: the cast ran on the shard), so the backward's
transpose of that gather is a reduce-scatter and the gradients leave already in the FSDP layout. A weight passed in
replicated over data instead would come back through a psum of the local experts' whole gradients over every axis
it does not name: an all-reduce of twice the bytes, and a full-size gradient buffer on every device.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from sharding.rules import logical_to_mesh_spec, param_spec

EXPERT_AXIS = "expert"
# Backends whose XLA implements ragged_all_to_all (jax.Device.platform / jax.default_backend() names).
_NATIVE_RAGGED_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
TRANSPORTS = ("padded", "ragged")
DEFAULT_TRANSPORT = "padded"  # see the module docstring for the measurement behind it
# Logical axis names of the expert weights (the MoE layer's parameters): w1, w3 [E, D, F] and w2 [E, F, D].
W_IN_NAMES = ("experts", "embed", "mlp")
W_OUT_NAMES = ("experts", "mlp", "embed")


def capacity(n_local: int, k: int, num_experts: int, ep: int, capacity_factor: float | None) -> int:
    """Rows each device reserves per destination shard (padded), or receives per source shard at most (ragged)."""
    local_experts = num_experts // ep
    worst = n_local * min(k, local_experts)
    if capacity_factor is None:
        return worst
    return max(1, min(worst, math.ceil(capacity_factor * n_local * k / ep)))


def resolve_transport(transport: str | None, platform: str) -> tuple[str, bool]:
    """-> (transport, emulate): ``DEFAULT_TRANSPORT`` when None; ``emulate`` when ragged is not native on ``platform``."""
    if transport is None:
        transport = DEFAULT_TRANSPORT
    if transport not in TRANSPORTS:
        raise ValueError(f"expert-parallel transport must be one of {TRANSPORTS} or None, got {transport!r}")
    return transport, transport == "ragged" and platform not in _NATIVE_RAGGED_PLATFORMS


def mesh_platform(mesh) -> str:
    """The platform of ``mesh``'s devices ("cpu", "gpu", "tpu"); the default backend's without a mesh."""
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


# --------------------------------------------------------------------------------------------- shared steps


def _pack(dest: jax.Array, ep: int, cap: int):
    """dest [S] destination shard of each assignment -> (position in its destination's buffer [S], kept [S])."""
    one_hot = jax.nn.one_hot(dest, ep, dtype=jnp.int32)                    # [S, EP]
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=1)  # rank among same-destination slots
    return position, position < cap


def _expert_ffn(xs, group_sizes, w1, w3, w2, swiglu, grouped_matmul):
    """xs [R, D] grouped by local expert (group_sizes [E_local], summing to <= R) -> [R, D] SwiGLU outputs (in xs's
    dtype).

    Rows past sum(group_sizes) belong to no group; their outputs are never read."""
    gate = grouped_matmul(xs, w1, group_sizes)
    up = grouped_matmul(xs, w3, group_sizes)
    return grouped_matmul(swiglu(gate, up).astype(xs.dtype), w2, group_sizes)


def _combine(y_slots, kept, weights):
    """y_slots [n*k, D] expert outputs in assignment order, kept [n*k], weights [n, k] -> [n, D] fp32 (the einsum
    multiplies y_slots in fp32 without keeping an fp32 copy of it for the backward)."""
    n, k = weights.shape
    y = y_slots * kept[:, None]                                 # dropped slots may hold anything: zero them
    return jnp.einsum("nkd,nk->nd", y.reshape(n, k, -1), weights.astype(jnp.float32))


# ------------------------------------------------------------------------------------------ padded transport


def _padded_transport(x, flat, dest, position, kept, ffn, *, ep, cap, num_local):
    """All-to-all of a ``[EP * cap, D]`` buffer each way -> y_slots [n*k, D] (valid where kept)."""
    k = flat.shape[0] // x.shape[0]
    slot = jnp.where(kept, dest * cap + position, ep * cap)     # dropped -> out of bounds, discarded by mode="drop"
    send = jnp.zeros((ep * cap, x.shape[1]), x.dtype).at[slot].set(jnp.repeat(x, k, axis=0), mode="drop")
    send_expert = jnp.zeros((ep * cap,), jnp.int32).at[slot].set(flat % num_local, mode="drop")
    send_valid = jnp.zeros((ep * cap,), bool).at[slot].set(True, mode="drop")

    def exchange(a):  # [EP*cap, ...]: block j goes to shard j; block j received came from shard j
        return a if ep == 1 else jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)

    rows, local_expert, valid = exchange(send), exchange(send_expert), exchange(send_valid)
    key = jnp.where(valid, local_expert, num_local)             # empty rows sort last, outside every group
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    ys = ffn(jnp.take(rows, order, axis=0), group_sizes)
    back = exchange(jnp.zeros_like(ys).at[order].set(ys))       # [EP*cap, D], in send order
    return jnp.take(back, jnp.minimum(slot, ep * cap - 1), axis=0)


# ------------------------------------------------------------------------------------------ ragged transport


class RaggedPlan(NamedTuple):
    """One device's arguments for the two ``ragged_all_to_all`` calls (int32; K = EP * E_local segments).

    Segment ``j * E_local + e`` of the forward call carries this device's rows for local expert e of shard j; on the
    receiver, rows arrive grouped by local expert and, within an expert, by source shard.
    """
    input_offsets: jax.Array   # [K] start of each segment in this device's expert-sorted send buffer
    send_sizes: jax.Array      # [K] rows this device sends to (shard j, local expert e)
    output_offsets: jax.Array  # [K] where that segment lands in shard j's receive buffer
    recv_sizes: jax.Array      # [K] rows received from (source shard s, my local expert e), index s * E_local + e
    recv_offsets: jax.Array    # [K] where they land locally (the reverse call's input_offsets)
    return_offsets: jax.Array  # [K] where the results go back to in shard s's buffer (the reverse output_offsets)
    group_sizes: jax.Array     # [E_local] received rows per local expert


def ragged_plan(counts: jax.Array, me, num_local: int) -> RaggedPlan:
    """counts [EP, E] int: rows shard s sends to global expert e (all shards'); me: this shard's index -> RaggedPlan.

    Pure (no collectives); every shard computes the same layout from the same all-gathered counts. Send buffers are
    sorted by global expert, so a segment starts at the exclusive cumsum of its shard's counts; a receive buffer holds
    local expert 0's rows from shard 0, 1, ..., then local expert 1's, and so on.
    """
    counts = counts.astype(jnp.int32)
    ep = counts.shape[0]
    c3 = counts.reshape(ep, ep, num_local)                                  # [src, dst, local expert]
    send_start = (jnp.cumsum(counts, axis=1) - counts).reshape(ep, ep, num_local)
    per_expert = jnp.sum(c3, axis=0)                                        # [dst, e] rows each expert receives
    group_start = jnp.cumsum(per_expert, axis=1) - per_expert               # [dst, e]
    recv_start = group_start[None] + jnp.cumsum(c3, axis=0) - c3             # [src, dst, e]
    return RaggedPlan(
        input_offsets=send_start[me].reshape(-1), send_sizes=c3[me].reshape(-1),
        output_offsets=recv_start[me].reshape(-1), recv_sizes=c3[:, me].reshape(-1),
        recv_offsets=recv_start[:, me].reshape(-1), return_offsets=send_start[:, me].reshape(-1),
        group_sizes=per_expert[me])


def _receive(operands, output, input_offsets, output_offsets, recv_sizes, me):
    """The receive side of ragged_all_to_all given every sender's data: operands [P, N, ...], input_offsets and
    output_offsets [P, K] (row s = sender s's arguments), this device's recv_sizes [K] and index me -> [M, ...]."""
    p, num = input_offsets.shape
    per_device = num // p
    mine = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=me * per_device, slice_size=per_device, axis=1)
    src_start, dst_start = mine(input_offsets), mine(output_offsets)        # [P, K/P]: segments addressed to me
    sizes = recv_sizes.reshape(p, per_device)
    rows = jnp.arange(output.shape[0])[:, None, None]
    inside = (rows >= dst_start) & (rows < dst_start + sizes)              # [M, P, K/P]
    which = jnp.argmax(inside.reshape(output.shape[0], -1), axis=1)         # the segment covering each row, if any
    src, seg = which // per_device, which % per_device
    row = src_start[src, seg] + jnp.arange(output.shape[0]) - dst_start[src, seg]
    got = operands[src, jnp.clip(row, 0, operands.shape[1] - 1)]
    hit = jnp.any(inside, axis=(1, 2)).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(hit, got.astype(output.dtype), output)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``jax.lax.ragged_all_to_all`` with the same arguments and result, from ``all_gather`` (inside shard_map).

    For backends without the collective (XLA:CPU) and for tests: it gathers every shard's operand ([P, N, ...]), so
    it costs P x the memory of the real thing. ``send_sizes`` is not read: the collective requires it to equal the
    transposed ``recv_sizes``, which decide what is written.
    """
    del send_sizes
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name)
    return _receive(gather(operand), output, gather(input_offsets), gather(output_offsets), recv_sizes,
                    jax.lax.axis_index(axis_name))


def _ragged_exchange(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, ep, emulate):
    if ep == 1:  # one shard: a local copy with the same semantics
        return _receive(operand[None], output, input_offsets[None], output_offsets[None], recv_sizes, 0)
    fn = ragged_all_to_all_emulated if emulate else jax.lax.ragged_all_to_all
    return fn(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=EXPERT_AXIS)


def _ragged_transport(x, flat, kept, ffn, *, ep, cap, num_local, emulate):
    """ragged_all_to_all of the kept rows each way (receive buffer ``[EP * cap, D]``) -> y_slots [n*k, D]."""
    num_experts = ep * num_local
    k = flat.shape[0] // x.shape[0]
    key = jnp.where(kept, flat, num_experts)                    # dropped assignments sort last and are not sent
    order = jnp.argsort(key, stable=True)                       # [S]: by global expert = by destination, local expert
    counts = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)  # [E]
    if ep == 1:
        plan = ragged_plan(counts[None], 0, num_local)
    else:
        plan = ragged_plan(jax.lax.all_gather(counts, EXPERT_AXIS), jax.lax.axis_index(EXPERT_AXIS), num_local)
    exchange = functools.partial(_ragged_exchange, ep=ep, emulate=emulate)
    send = jnp.take(x, order // k, axis=0)                      # [S, D] token rows in expert order
    recv = exchange(send, jnp.zeros((ep * cap, x.shape[1]), x.dtype), plan.input_offsets, plan.send_sizes,
                    plan.output_offsets, plan.recv_sizes)       # [EP*cap, D], grouped by local expert
    ys = ffn(recv, plan.group_sizes)
    back = exchange(ys, jnp.zeros((flat.shape[0], ys.shape[1]), ys.dtype), plan.recv_offsets, plan.recv_sizes,
                    plan.return_offsets, plan.send_sizes)      # [S, D] in send order; unsent rows stay 0
    return jnp.zeros_like(back).at[order].set(back)


# ---------------------------------------------------------------------------------------------------- entry


def _gather_weight(w, spec: P):
    """This device's block of an expert weight (placed by ``spec``) -> its local experts' whole weight [E/EP, ...]:
    a tiled all-gather of every later dim over the axes that split it; the transpose reduce-scatters the gradient."""
    for dim, entry in enumerate(spec[1:], start=1):
        if axes := _axes(entry):
            w = jax.lax.all_gather(w, axes, axis=dim, tiled=True)
    return w


def _weight_spec(names, shape, mesh, ep: int) -> P:
    """The shard_map spec of an expert weight: experts over ``expert``, the other dims as the parameter is placed."""
    return P(EXPERT_AXIS if ep > 1 else None, *param_spec(names, shape, mesh)[1:])


def _moe_shard(x, weights, experts, w1, w3, w2, *, ep, cap, transport, emulate, swiglu, grouped_matmul,
               w_specs=(P(), P(), P())):
    """Per device: x [n, D], weights/experts [n, k], w* blocks of the E/EP local experts placed by ``w_specs``
    -> [n, D] fp32."""
    w1, w3, w2 = (_gather_weight(w, spec) for w, spec in zip((w1, w3, w2), w_specs))
    num_local = w1.shape[0]
    flat = experts.reshape(-1)                                  # [S = n*k] global expert of each assignment
    dest = flat // num_local
    position, kept = _pack(dest, ep, cap)
    ffn = functools.partial(_expert_ffn, w1=w1, w3=w3, w2=w2, swiglu=swiglu, grouped_matmul=grouped_matmul)
    if transport == "padded":
        y_slots = _padded_transport(x, flat, dest, position, kept, ffn, ep=ep, cap=cap, num_local=num_local)
    else:
        y_slots = _ragged_transport(x, flat, kept, ffn, ep=ep, cap=cap, num_local=num_local, emulate=emulate)
    return _combine(y_slots, kept, weights)


def moe_expert_parallel(x, weights, experts, w1, w3, w2, *, swiglu, grouped_matmul, capacity_factor=None,
                        transport=None):
    """x [N, D]; weights, experts [N, k]; w1/w3 [E, D, F]; w2 [E, F, D] -> [N, D] fp32 (== moe_dense when dropless).

    Runs under the mesh set by ``jax.set_mesh`` (axis ``expert`` of size EP dividing E); without one, or with
    EP == 1, the same code runs on one shard. Token rows are split over every mesh axis that the rules give
    "batch" and "length" (N = B*T flattened, batch-major), experts over ``expert``; the weights' other dims enter as
    the parameters are placed (FSDP under ``fsdp_params()``) and are all-gathered inside, so their gradients are
    reduce-scattered (tensor parallelism inside the experts is not done here). ``transport``: "padded", "ragged" or None
    (``DEFAULT_TRANSPORT``, padded); "ragged" on a backend without ``ragged_all_to_all`` uses the emulation.
    """
    mesh = jax.sharding.get_abstract_mesh()
    transport, emulate = resolve_transport(transport, mesh_platform(mesh))
    num_experts = w1.shape[0]
    ep = 1 if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes)).get(EXPERT_AXIS, 1)
    if num_experts % ep:
        raise ValueError(f"expert parallelism needs num_experts={num_experts} divisible by expert={ep}")
    n, k = experts.shape
    body = functools.partial(_moe_shard, ep=ep, transport=transport, emulate=emulate, swiglu=swiglu,
                             grouped_matmul=grouped_matmul)
    if mesh.empty:
        return body(x, weights, experts, w1, w3, w2, cap=capacity(n, k, num_experts, 1, capacity_factor))
    rows = logical_to_mesh_spec((("batch", "length"),), shape=(n,), mesh=mesh)  # N = B*T rows, batch-major
    shards = math.prod(mesh.shape[a] for a in _axes(rows[0]))
    w_specs = tuple(_weight_spec(names, w.shape, mesh, ep)
                    for names, w in zip((W_IN_NAMES, W_IN_NAMES, W_OUT_NAMES), (w1, w3, w2)))
    body = functools.partial(body, cap=capacity(n // shards, k, num_experts, ep, capacity_factor), w_specs=w_specs)
    return jax.shard_map(body, in_specs=(rows, rows, rows, *w_specs), out_specs=rows,
                         check_vma=False)(x, weights, experts, w1, w3, w2)


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
