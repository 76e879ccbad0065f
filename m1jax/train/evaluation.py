"""Evaluation hooks: functions ``state -> {name: value}`` the trainer calls every ``run.eval_every`` steps; their
values join that step's metrics record as ``<hook name>/<name>``.

``make_loss_evaluator`` is the built-in one: the masked next-token loss on held-out data, over the same batches at
every evaluation (a fresh loader each time), so the numbers are comparable from one evaluation to the next.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.train.config import TrainConfig
from m1jax.train.loss import lm_loss
from m1jax.train.state import TrainState
from sharding.rules import fsdp_params

Evaluator = Callable[[TrainState], Mapping[str, float]]


def make_loss_evaluator(graphdef, tc: TrainConfig, make_loader: Callable[[], Iterator[dict]], batches: int, *,
                        param_shardings: Any = None, batch_shardings: Any = None, fsdp: bool = False) -> Evaluator:
    """state -> {"loss": summed masked NLL / masked tokens over ``batches`` batches of ``make_loader()``}."""
    def sums(params, batch):
        with fsdp_params(fsdp):
            _, (nll_sum, _) = lm_loss(params, graphdef, batch, tc, jnp.float32(1.0))
        return nll_sum, jnp.sum(batch["loss_mask"].astype(jnp.float32))

    if param_shardings is None:
        jitted = jax.jit(sums)
    else:
        replicated = NamedSharding(jax.tree_util.tree_leaves(param_shardings)[0].mesh, P())
        jitted = jax.jit(sums, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated)

    def evaluate(state: TrainState) -> dict[str, float]:
        loader = make_loader()
        nll = tokens = 0.0
        for _ in range(batches):
            batch_nll, batch_tokens = jitted(state.params, next(loader))
            nll, tokens = nll + float(batch_nll), tokens + float(batch_tokens)
        return {"loss": nll / max(tokens, 1.0)}

    return evaluate
