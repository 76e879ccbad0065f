"""One optimizer update as a jitted function: ``(state, batch) -> (state, metrics)`` with the state donated.

The metrics hold ``finite`` (1.0 when the loss, the balance loss and the gradient norm are all finite, else 0.0).
With ``skip_nonfinite`` the step decides inside the jitted function to drop a non-finite update: params and optimizer
state come back unchanged (only ``step`` advances, so the schedule and the data move on), with no host round trip
beyond the metrics the loop fetches anyway.

A batch is a dict of ``[B, T]`` arrays (``m1jax.data.batch``): ``inputs``, ``targets``, ``loss_mask``,
``segment_ids`` (packed documents; on GPU the softmax layers then use a segment-masked flash kernel, and without
them cuDNN's fused attention) and ``positions``.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.data.batch import BATCH_KEYS
from m1jax.train.config import TrainConfig
from m1jax.train.loss import lm_loss
from m1jax.train.optimizer import make_optimizer, make_schedule
from m1jax.train.state import TrainState
from sharding.rules import fsdp_params


def train_step(state: TrainState, batch: dict, *, graphdef, tc: TrainConfig,
               skip_nonfinite: bool = False) -> tuple[TrainState, dict]:
    """One optimizer update over ``tc.grad_accum`` micro-batches (a scan whose carry sums the gradients in fp32; no
    scan for one); with ``skip_nonfinite``, no update at all when the loss or the gradient norm is not finite."""
    a = tc.grad_accum
    b = batch["inputs"].shape[0]
    if b % a:
        raise ValueError(f"batch size {b} is not divisible by grad_accum={a}")
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    grad_fn = jax.value_and_grad(lm_loss, has_aux=True)
    if a == 1:
        (_, (nll_sums, auxes)), grads = grad_fn(state.params, graphdef, batch, tc, n_tokens)
    else:
        # The fp32 sum is the scan's carry: XLA updates it in place (the loop body's add writes into the carry
        # buffer), so each micro-batch costs one read-add-write of the gradient, and the update below runs once.
        def one(grads, mb):
            (_, (nll_sum, aux)), g = grad_fn(state.params, graphdef, mb, tc, n_tokens)
            return jax.tree_util.tree_map(lambda acc, x: acc + x.astype(jnp.float32), grads, g), (nll_sum, aux)

        zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        micro = {k: v.reshape(a, b // a, *v.shape[1:]) for k, v in batch.items()}
        grads, (nll_sums, auxes) = jax.lax.scan(one, zeros, micro)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss, aux, grad_norm = jnp.sum(nll_sums) / n_tokens, jnp.mean(auxes), optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(aux) & jnp.isfinite(grad_norm)
    if skip_nonfinite:
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree_util.tree_map(keep, params, state.params)
        opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    metrics = {"loss": loss, "aux_loss": aux, "grad_norm": grad_norm, "learning_rate": make_schedule(tc)(state.step),
               "tokens": n_tokens, "finite": finite.astype(jnp.float32)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics


def batch_shardings(mesh: jax.sharding.Mesh, shape, keys=BATCH_KEYS) -> dict[str, NamedSharding]:
    """Every batch array [B, T] sharded by the rules' ("batch", "length") mapping."""
    from sharding.rules import batch_sharding

    sharding = batch_sharding(mesh, tuple(shape))
    return {k: sharding for k in keys}


def make_train_step(graphdef, tc: TrainConfig, state_shardings: Any = None, batch_shardings: Any = None,
                    fsdp: bool = False, skip_nonfinite: bool = False) -> Callable[[TrainState, dict],
                                                                                tuple[TrainState, dict]]:
    """jit(train_step) with the state donated; with shardings, inputs and outputs keep that placement and the
    metrics come back replicated. ``skip_nonfinite``: see the module docstring.

    ``fsdp``: the params are FSDP-sharded (``train_state_shardings(..., fsdp=True)``); the step is then traced under
    ``sharding.rules.fsdp_params()`` so each weight is cast to the compute dtype on its shard and all-gathered in
    bf16, not fp32. Entered inside the traced function: the setting is not part of jit's cache key.
    """
    def fn(state, batch):
        with fsdp_params(fsdp):
            return train_step(state, batch, graphdef=graphdef, tc=tc, skip_nonfinite=skip_nonfinite)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=0)
    replicated = NamedSharding(jax.tree_util.tree_leaves(state_shardings)[0].mesh, P())
    return jax.jit(fn, donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated))


def host_metrics(metrics: dict) -> dict[str, float]:
    """Replicated device scalars -> Python floats (blocks until the step that produced them is done)."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
