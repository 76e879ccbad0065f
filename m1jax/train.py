"""The pretraining/SFT step: next-token cross-entropy through the fp32 LM head + the MoE aux loss, AdamW with M1's
settings, warm-up + decay schedules, gradient accumulation, donated sharded state.

Functional NNX (DESIGN.md): ``graphdef`` is static, ``TrainState`` holds the pytrees (params are an ``nnx.State`` of fp32
masters; the model casts to ``cfg.compute_dtype`` inside its layers), and ``make_train_step`` returns one jitted
``(state, batch) -> (state, metrics)`` with the state donated.

A batch is a dict of ``[B, T]`` arrays: ``inputs`` (int), ``targets`` (int), ``loss_mask`` (bool/float),
``segment_ids`` (int, packed documents; on GPU the softmax layers then use a segment-masked flash kernel, and
without them cuDNN's fused attention), ``positions`` (int). ``m1jax.data`` produces them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.config import LIGHTNING, ModelConfig
from m1jax.losses import linear_cross_entropy
from m1jax.model import MiniMaxM1
from sharding.rules import fsdp_params

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loss settings. Defaults are M1's AdamW (beta1 0.9, beta2 0.95, eps 1e-15:
    spec rl-cispo.md section 3; verl's 0.999 / 1e-8 failed to converge there)."""
    learning_rate: float = 3e-4
    schedule: str = "cosine"          # after warm-up: cosine | linear decay to final_lr_ratio * lr, or constant
    warmup_steps: int = 0
    total_steps: int = 1000           # length of warm-up + decay
    final_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-15
    weight_decay: float = 0.1         # on matrices only (ndim >= 2); norms' gains are not decayed
    clip_norm: float | None = 1.0     # global-norm clipping of the accumulated gradient
    grad_accum: int = 1               # micro-batches per step (the batch's leading axis is split into this many)
    ce_chunk_size: int = 8192         # vocabulary columns per chunk of the fused head + cross-entropy
    ce_implementation: str = "chunked"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise ValueError(f"TrainConfig.grad_accum must be >= 1, got {self.grad_accum}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError("TrainConfig: need warmup_steps >= 0 and total_steps >= 1")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array        # int32 scalar: optimizer updates done
    params: Any            # nnx.State of nnx.Param (fp32 masters)
    opt_state: Any         # optax state (moments mirror params)
    rng: jax.Array         # uint32 [2] raw key data (threefry): per-step randomness, folded with the step


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then the decay until ``total_steps``."""
    lr, end = tc.learning_rate, tc.learning_rate * tc.final_lr_ratio
    decay_steps = max(tc.total_steps - tc.warmup_steps, 1)
    if tc.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=tc.final_lr_ratio)
    elif tc.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay_steps)
    else:
        after = optax.constant_schedule(lr)
    if tc.warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, tc.warmup_steps), after], [tc.warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

    adamw = optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return adamw if tc.clip_norm is None else optax.chain(optax.clip_by_global_norm(tc.clip_norm), adamw)


# ------------------------------------------------------------------------------------------------ state
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


def batch_shardings(mesh: jax.sharding.Mesh, shape, keys=BATCH_KEYS) -> dict[str, NamedSharding]:
    """Every batch array [B, T] sharded by the rules' ("batch", "length") mapping."""
    from sharding.rules import logical_to_mesh_spec

    sharding = NamedSharding(mesh, logical_to_mesh_spec(("batch", "length"), shape=tuple(shape), mesh=mesh))
    return {k: sharding for k in keys}


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


# ------------------------------------------------------------------------------------------------ loss
def head_kernel(model: MiniMaxM1) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    return model.embed_tokens.embedding[...].T if model.lm_head is None else model.lm_head.kernel[...]


def lm_loss(params, graphdef, batch: dict, tc: TrainConfig, n_tokens: jax.Array):
    """Summed masked next-token NLL / ``n_tokens`` + coef * aux loss, for one (micro-)batch.

    Returns (loss, (nll_sum, aux_loss)); ``n_tokens`` is the whole step's mask count, so micro-batch losses add up to
    the batch mean.
    """
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    out = model.backbone(batch["inputs"], batch["positions"], batch.get("segment_ids"))
    hidden = out.hidden.astype(jnp.dtype(cfg.compute_dtype))
    nll = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head_kernel(model),
                               batch["targets"].reshape(-1), chunk_size=tc.ce_chunk_size, fp32=cfg.lm_head_fp32,
                               fp32_precision=cfg.lm_head_precision, implementation=tc.ce_implementation)
    nll_sum = jnp.sum(nll * batch["loss_mask"].reshape(-1).astype(jnp.float32))
    loss = nll_sum / n_tokens + cfg.router_aux_loss_coef * out.aux_loss / tc.grad_accum
    return loss, (nll_sum, out.aux_loss)


def train_step(state: TrainState, batch: dict, *, graphdef, tc: TrainConfig) -> tuple[TrainState, dict]:
    """One optimizer update over ``tc.grad_accum`` micro-batches (a scan; gradients summed in fp32)."""
    a = tc.grad_accum
    b = batch["inputs"].shape[0]
    if b % a:
        raise ValueError(f"batch size {b} is not divisible by grad_accum={a}")
    n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    micro = {k: v.reshape(a, b // a, *v.shape[1:]) for k, v in batch.items()}
    grad_fn = jax.value_and_grad(lm_loss, has_aux=True)

    def one(grads, mb):
        (_, (nll_sum, aux)), g = grad_fn(state.params, graphdef, mb, tc, n_tokens)
        return jax.tree_util.tree_map(jnp.add, grads, g), (nll_sum, aux)

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    grads, (nll_sums, auxes) = jax.lax.scan(one, zeros, micro)
    grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, state.params)
    tx = make_optimizer(tc)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": jnp.sum(nll_sums) / n_tokens, "aux_loss": jnp.mean(auxes), "grad_norm": optax.tree.norm(grads),
               "learning_rate": make_schedule(tc)(state.step), "tokens": n_tokens}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics


def make_train_step(graphdef, tc: TrainConfig, state_shardings: Any = None, batch_shardings: Any = None,
                    fsdp: bool = False) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(train_step) with the state donated; with shardings, inputs and outputs keep that placement.

    ``fsdp``: the params are FSDP-sharded (``train_state_shardings(..., fsdp=True)``); the step is then traced under
    ``sharding.rules.fsdp_params()`` so each weight is cast to the compute dtype on its shard and all-gathered in
    bf16, not fp32. Entered inside the traced function: the setting is not part of jit's cache key.
    """
    def fn(state, batch):
        with fsdp_params(fsdp):
            return train_step(state, batch, graphdef=graphdef, tc=tc)
    if state_shardings is None:
        return jax.jit(fn, donate_argnums=0)
    replicated = NamedSharding(jax.tree_util.tree_leaves(state_shardings)[0].mesh, P())
    return jax.jit(fn, donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated))


# ------------------------------------------------------------------------------------------------ FLOPs
LIGHTNING_CHUNK = 64  # chunk size C of the lightning FLOP count (spec performance.md section 7)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward):
    6 x active matmul parameters (projections, router, top-k experts, LM head; the embedding gather is free)
    + lightning layers 3 x 4·H·d·(C + d) (chunked form, C = 64, spec performance.md 7)
    + softmax layers 3 x 2·T·H·d (causal QKᵀ and PV averaged over positions: 4·H·d·T/2 forward)."""
    counts = cfg.param_counts()
    matmul = 6.0 * counts["active_with_head"]
    h, d = cfg.num_attention_heads, cfg.head_dim
    n_light = sum(t == LIGHTNING for t in cfg.layer_types)
    n_soft = cfg.num_hidden_layers - n_light
    lightning = 3.0 * n_light * 4 * h * d * (LIGHTNING_CHUNK + d)
    softmax = 3.0 * n_soft * 2 * seq_len * h * d
    return matmul + lightning + softmax


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
                    "TPU v6 lite": 918.0}


def peak_tflops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 datasheet peak of ``device`` (None when unknown, e.g. CPU): the MFU denominator."""
    kind = (device or jax.devices()[0]).device_kind
    for name, tflops in PEAK_BF16_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops
    return None


def host_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}
