"""Checking sharded == unsharded: a tiny M1-pattern config, an LM loss, a jitted (loss, grads), a tree comparison."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.config import ModelConfig, m1_layer_types
from m1jax.model import MiniMaxM1
from sharding.rules import batch_sharding, state_shardings


def tiny_config(**overrides) -> ModelConfig:
    """2 periods of (lightning, softmax): exercises the scan, both attention kinds and the MoE; dims divide 8."""
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, layer_types=m1_layer_types(4, 2),
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=16,
                num_local_experts=8, num_experts_per_tok=2, rotary_dim=4, block_size=4, router_aux_loss_coef=0.01)
    base.update(overrides)
    return ModelConfig.tiny(**base)


def batch(cfg: ModelConfig, b: int = 8, t: int = 16, seed: int = 0, packed: bool = True):
    """tokens [b, t] int32 and segment ids [b, t] (two packed documents per row, split off the shard boundaries)."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    cuts = rng.integers(1, t, (b, 1))
    segments = jnp.asarray((np.arange(t)[None] >= cuts).astype(np.int32)) if packed else None
    return tokens, segments


def lm_loss(params, graphdef, tokens, segment_ids):
    """Next-token cross-entropy (within documents) + aux coefficient * load-balancing loss; scalar fp32."""
    model = nnx.merge(graphdef, params)
    out = model(tokens, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = jnp.ones_like(nll) if segment_ids is None else (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(
        nll.dtype)
    return jnp.sum(nll * mask) / jnp.sum(mask) + model.cfg.router_aux_loss_coef * out.aux_loss


def init(cfg: ModelConfig, seed: int = 0):
    return nnx.split(MiniMaxM1(cfg, rngs=nnx.Rngs(params=seed)), nnx.Param)


def loss_and_grads(cfg, params, tokens, segments, mesh=None, fsdp=False):
    """jit(value_and_grad(lm_loss)); with a mesh: params and batch sharded by the rules, run under jax.set_mesh."""
    graphdef, _ = nnx.split(MiniMaxM1(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
    fn = jax.value_and_grad(lambda p, t, s: lm_loss(p, graphdef, t, s))
    if mesh is None:
        return jax.jit(fn)(params, tokens, segments)
    p_sh = state_shardings(params, mesh, fsdp=fsdp)
    b_sh = batch_sharding(mesh, tokens.shape)
    jitted = jax.jit(fn, in_shardings=(p_sh, b_sh, b_sh), out_shardings=(NamedSharding(mesh, P()), p_sh))
    with jax.set_mesh(mesh):
        return jitted(jax.device_put(params, p_sh), jax.device_put(tokens, b_sh), jax.device_put(segments, b_sh))


def assert_close_tree(got, want, rtol=1e-5):
    """Per leaf ||got - want|| <= rtol * ||want|| (plus a tiny floor for all-zero leaves)."""
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = jax.tree_util.tree_leaves(want)
    assert len(flat_got) == len(flat_want)
    for (path, g), w in zip(flat_got, flat_want):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        err, ref = np.linalg.norm(g - w), np.linalg.norm(w)
        assert err <= rtol * ref + 1e-12, f"{jax.tree_util.keystr(path)}: rel err {err / max(ref, 1e-30):.3g}"


def equations(jaxpr):
    """Every equation of ``jaxpr`` at any depth (scan, jit, shard_map and custom-VJP bodies included), in order."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                item = item.jaxpr if isinstance(item, jax.extend.core.ClosedJaxpr) else item
                if isinstance(item, jax.extend.core.Jaxpr):
                    yield from equations(item)
