"""The training state and where it lives: ``TrainState`` (step, fp32 master params, optimizer state, rng), its
abstract shapes for sharding plans and checkpoint restores, and its placement on a mesh.

Functional NNX: ``split_model`` separates the static graph definition from the parameter pytree; every jitted
function works on the pytree and merges the model only inside.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1
from m1jax.train.config import TrainConfig
from m1jax.train.optimizer import make_optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array        # int32 scalar: optimizer updates done
    params: Any            # nnx.State of nnx.Param (fp32 masters)
    opt_state: Any         # optax state (moments mirror params)
    rng: jax.Array         # uint32 [2] raw key data (threefry): per-step randomness, folded with the step


def split_model(model: MiniMaxM1):
    """model -> (graphdef, params). The model holds only nnx.Param variables (no batch stats, no rngs)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree_util.tree_leaves(rest):
        raise ValueError("the model has non-Param state, which the train step does not carry")
    return graphdef, params


def init_train_state(params, tc: TrainConfig, seed: int = 0) -> TrainState:
    """A TrainState at step 0 around ``params`` (arrays, placed as the caller placed them)."""
    opt_state = make_optimizer(tc).init(params)
    rng = jax.random.key_data(jax.random.key(seed, impl="threefry2x32"))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)


def abstract_train_state(cfg: ModelConfig, tc: TrainConfig):
    """(graphdef, TrainState of ShapeDtypeStructs): shapes for sharding plans and checkpoint restore targets."""
    graphdef, params = split_model(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(params=0))))
    return graphdef, jax.eval_shape(lambda p: init_train_state(p, tc), params)


def train_state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh, fsdp: bool = False) -> TrainState:
    """NamedShardings for every leaf: params by the logical-axis rules, optimizer moments like their params (their
    nnx.Param metadata carries the logical names), scalars and the rng replicated."""
    from sharding.rules import state_shardings

    return state_shardings(abstract_state, mesh, fsdp)


def create_train_state(cfg: ModelConfig, tc: TrainConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                       fsdp: bool = False):
    """(graphdef, TrainState) with freshly initialised parameters, born sharded on ``mesh`` (jit with out_shardings,
    so no host holds the whole model)."""
    graphdef, abstract = abstract_train_state(cfg, tc)

    def build():
        _, params = split_model(MiniMaxM1(cfg, rngs=nnx.Rngs(params=seed)))
        return init_train_state(params, tc, seed)

    shardings = None if mesh is None else train_state_shardings(abstract, mesh, fsdp)
    return graphdef, jax.jit(build, out_shardings=shardings)()
