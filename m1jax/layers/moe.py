"""Mixture of Experts (every M1 layer): fp32 router, top-k with renormalised weights, SwiGLU experts (docs/model.md §5).

Two dispatch paths compute the same function:
* ``sorted`` (default): the N*k token-expert assignments are sorted by expert and run as grouped matmuls
  (dropless; ``pallas_kernels.gmm`` where available, ``jax.lax.ragged_dot`` otherwise);
* ``dense``: every expert on every token, weighted by the (mostly zero) routing matrix: the test oracle;
* ``expert_parallel``: ``sharding.expert_parallel`` (experts split over the mesh's ``expert`` axis, tokens moved by
  all-to-all (``cfg.moe_transport``: padded or ragged), dropless unless ``cfg.moe_capacity_factor``); the same as
  ``sorted`` when no mesh is set.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.layers.common import param, param_value
# Imported at module load, not inside a trace: importing Pallas registers jax config options that are part of jit's
# trace context, so a first import during tracing would make every jitted function retrace on its second call.
from pallas_kernels.gmm import api as gmm_api
from sharding.rules import fsdp_params_active


def route_top_k(router_logits: jax.Array, k: int):
    """router_logits [N, E] fp32 -> (weights [N, k] fp32 summing to 1, experts [N, k] int32).

    softmax over all experts, top-k, renormalise (== softmax over the k selected logits).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    return weights / jnp.sum(weights, axis=-1, keepdims=True), experts.astype(jnp.int32)


def load_balancing_stats(router_logits: jax.Array, experts: jax.Array, num_experts: int, valid=None):
    """Per-layer pieces of the Switch-style aux loss: (f [k, E] fraction of tokens sent to each expert per slot,
    P [E] mean router probability). ``valid`` [N] excludes padding tokens."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32)  # [N, k, E]
    if valid is None:
        return jnp.mean(one_hot, axis=0), jnp.mean(probs, axis=0)
    w = valid.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)
    return (jnp.einsum("n,nke->ke", w, one_hot) / denom, jnp.einsum("n,ne->e", w, probs) / denom)


def aux_loss_from_stats(f_sum: jax.Array, p_sum: jax.Array, num_layers: int, num_experts: int) -> jax.Array:
    """E * sum_{k,e} f * P over the layer-averaged statistics (= transformers' load_balancing_loss_func over the
    concatenation of all layers' router logits); equals top_k for perfectly balanced routing."""
    return num_experts * jnp.sum((f_sum / num_layers) * (p_sum / num_layers)[None, :])


def _grouped_matmul(lhs, rhs, group_sizes, implementation):
    """lhs [M, K] x rhs [G, K, N] -> [M, N] in lhs' dtype (the compute dtype), fp32 accumulation inside the kernel.

    Not an fp32 result: the gate/up/down outputs are the MoE's largest activations ([tokens x k, 9216] per layer)
    and the backward keeps them; an fp32 cotangent would also upcast the expert weights (and their FSDP gathers) to
    fp32 in the backward. bf16 outputs are what MiniMax's bf16 reference computes.
    """
    return gmm_api.grouped_matmul(lhs, rhs, group_sizes, implementation=implementation,
                                  preferred_element_type=lhs.dtype)


class MoE(nnx.Module):
    """h [B, T, D] -> (y [B, T, D], router_logits [B*T, E] fp32, experts [B*T, k])."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, e, std, pd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.initializer_range,
                            cfg.param_dtype)
        # The router is kept in fp32 whatever param_dtype says (the published checkpoint stores it in fp32 too).
        self.gate = param(rngs, (d, e), ("embed", None), std=std, dtype_name="float32")
        self.w1 = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype_name=pd)  # gate proj (SiLU)
        self.w3 = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=std, dtype_name=pd)  # up proj
        self.w2 = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=std, dtype_name=pd)  # down proj

    def __call__(self, h: jax.Array):
        cfg = self.cfg
        cdt = jnp.dtype(cfg.compute_dtype)
        b, t, d = h.shape
        x = h.reshape(b * t, d)
        router_logits = _router_logits(x, self.gate[...])
        weights, experts = route_top_k(router_logits, cfg.num_experts_per_tok)
        weights = weights.astype(cdt)  # as MiniMax's code: routing weights in the activation dtype for the sum
        if cfg.moe_implementation == "sorted" and not fsdp_params_active():
            # The grouped matmul takes the masters and multiplies in cdt; its backward writes the weight gradient
            # in the master's dtype from fp32 accumulators (no bf16 rounding of it, no cast pass over the gradients
            # of every expert weight). Under FSDP the cast stays before the all-gather (param_value), which then
            # moves cdt bytes.
            w1, w2, w3 = (w[...] for w in (self.w1, self.w2, self.w3))
        else:
            w1, w2, w3 = (param_value(w, cdt) for w in (self.w1, self.w2, self.w3))
        if cfg.moe_implementation == "dense":
            y = moe_dense(x.astype(cdt), weights, experts, w1, w3, w2)
        elif cfg.moe_implementation == "expert_parallel":
            from sharding.expert_parallel import moe_expert_parallel  # mesh-aware; imported only when chosen
            y = moe_expert_parallel(
                x.astype(cdt), weights, experts, w1, w3, w2, swiglu=_swiglu,
                grouped_matmul=lambda lhs, rhs, sizes: _grouped_matmul(lhs, rhs, sizes, cfg.gmm_implementation),
                capacity_factor=cfg.moe_capacity_factor, transport=cfg.moe_transport)
        else:
            y = moe_sorted(x.astype(cdt), weights, experts, w1, w3, w2, implementation=cfg.gmm_implementation)
        return y.reshape(b, t, d).astype(cdt), router_logits, experts


@jax.checkpoint
def _router_logits(x: jax.Array, gate: jax.Array) -> jax.Array:
    """x [N, D] (compute dtype) x gate [D, E] -> [N, E] fp32 logits from fp32 operands (exact fp32 products).

    Rematerialised: the backward keeps x in its own dtype and upcasts it again, where autodiff would keep the fp32
    copy (twice the bytes of bf16 x, for every layer of a scan).
    """
    return jnp.einsum("nd,de->ne", x.astype(jnp.float32), gate.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _swiglu(gate, up):
    """silu(gate) * up computed in fp32, returned in gate's dtype ([rows, F] each).

    A custom VJP for two reasons: the backward recomputes the fp32 silu from the saved gate and up (instead of
    keeping two fp32 [rows, F] arrays per layer: 11 GB per 8-layer period at M1's shapes), and it does so in one
    element-wise pass that reads gate, up and the bf16 cotangent and writes both gradients (autodiff of the
    checkpointed fp32 expression took three kernels on an H200, one of them an fp32 copy of the cotangent).
    """
    return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


def _swiglu_fwd(gate, up):
    return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
    gate, up = residuals
    g, u, dh = gate.astype(jnp.float32), up.astype(jnp.float32), dh.astype(jnp.float32)
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    d_gate = dh * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g) / dg = sig + g sig (1 - sig)
    return d_gate.astype(gate.dtype), (dh * silu).astype(up.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def moe_dense(x, weights, experts, w1, w3, w2):
    """Oracle: x [N, D] through all E experts, combined with the scattered top-k weights.

    Plain expressions throughout, autodiff for the gradient: the SwiGLU here is not ``_swiglu`` (whose backward is
    hand-written), so comparing the dispatch paths' gradients with this one also checks that backward."""
    num_experts = w1.shape[0]
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=weights.dtype) * weights[..., None], axis=1)  # [N,E]
    gate = jnp.einsum("nd,edf->nef", x, w1, preferred_element_type=x.dtype)
    up = jnp.einsum("nd,edf->nef", x, w3, preferred_element_type=x.dtype)
    hidden = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)  # _swiglu's forward, autodiff's backward
    y = jnp.einsum("nef,efd->ned", hidden.astype(x.dtype), w2, preferred_element_type=x.dtype)
    return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), combine.astype(jnp.float32))


@jax.custom_vjp
def _gather_rows(x, rows, inverse):
    """x[rows] for a permutation ``rows`` of x's leading axis whose inverse is ``inverse``: [M, D] -> [M, D].

    The custom gradient is the inverse gather ``g[inverse]``. Left to autodiff, the transpose of a gather is a
    scatter-add, which XLA runs on the GPU as an atomic scatter (measured on an H200 at m1-1b's shapes: the two
    dispatch scatters took 0.27 ms of a 3.0 ms lightning layer's forward + backward).
    """
    return jnp.take(x, rows, axis=0)


def _gather_rows_fwd(x, rows, inverse):
    return _gather_rows(x, rows, inverse), (rows, inverse)


def _gather_rows_bwd(residuals, g):
    rows, inverse = residuals
    return jnp.take(g, inverse, axis=0), None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def moe_sorted(x, weights, experts, w1, w3, w2, *, implementation=None):
    """Dropless dispatch: sort the N*k (token, expert) pairs by expert, grouped matmuls, unsort, weighted sum.

    x [N, D]; weights, experts [N, k]; w1/w3 [E, D, F]; w2 [E, F, D] -> [N, D] fp32.

    Sorting and unsorting are gathers in both directions (``_gather_rows``): slot i of the sorted order holds
    assignment ``order[i]`` (token ``order[i] // k``), and assignment a sits at sorted position ``position[a]``.
    """
    n, k = experts.shape
    num_experts = w1.shape[0]
    flat_experts = experts.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True).astype(jnp.int32)  # assignment slots sorted by expert
    position = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32))  # inverse of ``order``
    group_sizes = jnp.bincount(flat_experts, length=num_experts).astype(jnp.int32)
    # Each token repeated k times is in assignment order; its gradient sums the k copies (a reshape and a reduce).
    xs = _gather_rows(jnp.repeat(x, k, axis=0), order, position)  # [N*k, D]
    gate = _grouped_matmul(xs, w1, group_sizes, implementation)
    up = _grouped_matmul(xs, w3, group_sizes, implementation)
    ys = _grouped_matmul(_swiglu(gate, up).astype(x.dtype), w2, group_sizes, implementation)  # [N*k, D]
    return _combine(ys, position, order, weights)


@jax.checkpoint
def _combine(ys, position, order, weights):
    """ys [N*k, D] in expert order -> [N, D] fp32: back to assignment order, weighted sum of each token's k rows.

    Rematerialised: the backward keeps the grouped matmul's output ys (which exists anyway) and redoes the gather,
    where autodiff would keep the gathered rows in fp32 ([N, k, D], 4 bytes an element, for every layer of a
    scan).
    """
    n, k = weights.shape
    y_slots = _gather_rows(ys, position, order).reshape(n, k, -1)  # back to assignment order
    return jnp.einsum("nkd,nk->nd", y_slots.astype(jnp.float32), weights.astype(jnp.float32))
