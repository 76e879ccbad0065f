"""What the TPU compiler reports for the train step on a small v5p slice (from this CPU host): temporaries scale with
the per-device tokens, not with vocab x global tokens; FSDP gathers the layer weights in bf16."""
import re

import jax
import pytest

from m1jax import aot
from m1jax.config import ModelConfig
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding, fsdp_params, state_shardings
from tests import tiny_model as H


@pytest.fixture(scope="module")
def mesh():
    return make_mesh("data=2,expert=4", devices=aot.topology_devices("v5p:2x2x2"))


def _cfg(vocab, **kw):  # one 8-layer period, 4 experts (1 per expert shard)
    return ModelConfig.tiny(vocab_size=vocab, compute_dtype="bfloat16", remat=True,
                            moe_implementation="expert_parallel", **kw)


def test_temporaries_do_not_scale_with_vocab_times_global_tokens(mesh):
    """Growing V by dv may add per-device [local tokens, dv] logits chunks and the gathered [D, dv] head/embedding
    (and grads), never a replicated [B*T, dv] fp32 array (the shape of the regression this guards against)."""
    batch, length = 8, 256

    def temps(vocab):
        compiled = aot.lower_workload("train", _cfg(vocab), mesh, batch=batch, length=length, fsdp=True).compile()
        return aot.compile_report(compiled)["memory"]["temp_bytes"]

    small, big = temps(1024), temps(4096)
    replicated_logits = batch * length * (4096 - 1024) * 4
    assert big - small < replicated_logits / 2, (small, big, replicated_logits)


def _all_gathers(cfg, mesh, fsdp_context: bool):
    """(dtype, shape without size-1 dims) of every all-gather in the compiled FSDP loss + grads."""
    import jax.numpy as jnp

    graphdef, params = H.init(cfg)
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    p_sh, b_sh = state_shardings(params, mesh, fsdp=True), batch_sharding(mesh, tokens.shape)
    fn = jax.jit(jax.value_and_grad(lambda p, t, s: H.lm_loss(p, graphdef, t, s)), in_shardings=(p_sh, b_sh, b_sh))
    with jax.set_mesh(mesh), fsdp_params(fsdp_context):
        text = fn.lower(params, tokens, tokens).compile().as_text()
    return [(dtype, tuple(int(d) for d in dims.split(",") if d and int(d) != 1))
            for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(", text)]


def test_fsdp_weights_are_gathered_in_bf16(mesh):
    """Under fsdp_params() every FSDP all-gather of a layer weight matrix moves bf16 (the fp32 masters are cast on
    their shards first). The router [D, E] and the LM head [D, V] stay fp32 by design."""
    cfg = H.tiny_config(hidden_size=48, intermediate_size=24, compute_dtype="bfloat16",
                        moe_implementation="expert_parallel")
    d, w, kv, f, local = 48, 32, 16, 24, cfg.num_local_experts // 4
    weights = {(d, 3 * w), (d, w), (d, kv), (w, d), (local, d, f), (local, f, d)}
    gathers = [(dtype, shape) for dtype, shape in _all_gathers(cfg, mesh, True) if shape in weights]
    # The TPU partitioner may move a small weight's activations instead of gathering it ((d, kv) here), but the
    # big ones are gathered, and every weight it gathers moves bf16.
    assert {(d, 3 * w), (local, d, f), (local, f, d)} <= {shape for _, shape in gathers}, gathers
    assert all(dtype == "bf16" for dtype, _ in gathers), gathers
    # The mechanism behind it, independent of what a compiler chooses: the expert weights enter the MoE shard_map
    # already cast to bf16 (XLA:CPU would gather in fp32 anyway: it has no bf16 collectives).
    assert _shard_map_weight_dtypes(cfg, mesh) == {"bfloat16"}


def _shard_map_weight_dtypes(cfg, mesh) -> set[str]:
    """dtypes of the [E, ., .] expert weights where they enter a shard_map in the traced FSDP loss + grads."""
    import jax.numpy as jnp

    graphdef, params = H.init(cfg)
    tokens = jnp.zeros((8, 16), jnp.int32)
    with jax.set_mesh(mesh), fsdp_params():
        traced = jax.make_jaxpr(jax.value_and_grad(lambda p, t, s: H.lm_loss(p, graphdef, t, s)))(params, tokens, tokens)
    experts = cfg.num_local_experts
    return {str(v.aval.dtype) for e in H.equations(traced.jaxpr) if e.primitive.name == "shard_map" for v in e.invars
            if v.aval.ndim == 3 and v.aval.shape[0] == experts and v.aval.shape[1:] in {(48, 24), (24, 48)}}
