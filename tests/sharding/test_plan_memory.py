"""The compiled memory plan (m1jax.memory_plan) on a small fake mesh: temporaries scale with the per-device tokens, not
with vocab x global tokens; the plan's CPU stand-in for the grouped matmul keeps ragged_dot's values; FSDP gathers
the layer weights in bf16."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.config import ModelConfig
from pallas_kernels.gmm import backends as gmm_backends
from tests import tiny_model as H
from sharding.mesh import make_mesh
from m1jax.memory_plan import _grouped_matmul_group_loop, compiled_memory, kernel_like_grouped_matmul
from sharding.rules import batch_sharding, fsdp_params, state_shardings


def _cfg(vocab, **kw):  # one 8-layer period, 4 experts (1 per expert shard)
    return ModelConfig.tiny(vocab_size=vocab, compute_dtype="bfloat16", remat=True,
                            moe_implementation="expert_parallel", **kw)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    return make_mesh("data=2,expert=4", devices=jax.devices()[:8])


def _temp(cfg, mesh, batch=8, length=64):
    return compiled_memory(cfg, mesh, batch=batch, length=length, fsdp=True, mode="train")["temp_size_in_bytes"]


def test_temporaries_do_not_scale_with_vocab_times_global_tokens(mesh):
    """Growing V by dv may add per-device [local tokens, dv] logits chunks and the gathered [D, dv] head/embedding
    (and grads), never a replicated [B*T, dv] fp32 array (the shape of the regression this guards against)."""
    batch, length = 8, 256
    small, big = _temp(_cfg(1024), mesh, batch, length), _temp(_cfg(4096), mesh, batch, length)
    replicated_logits = batch * length * (4096 - 1024) * 4
    assert big - small < replicated_logits / 2, (small, big, replicated_logits)


def test_group_loop_equals_ragged_dot():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((40, 16)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((4, 16, 8)), jnp.float32)
    sizes = jnp.asarray([10, 0, 25, 3], jnp.int32)  # sum 38 < 40: trailing rows give zeros
    want = jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)
    got = _grouped_matmul_group_loop(lhs, rhs, sizes, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g_want = jax.grad(lambda a, b: jnp.sum(jax.lax.ragged_dot(a, b, sizes) ** 2), (0, 1))(lhs, rhs)
    g_got = jax.grad(lambda a, b: jnp.sum(_grouped_matmul_group_loop(a, b, sizes, jnp.float32) ** 2), (0, 1))(lhs, rhs)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    with kernel_like_grouped_matmul():
        assert gmm_backends.ragged_dot is _grouped_matmul_group_loop
    assert gmm_backends.ragged_dot is not _grouped_matmul_group_loop


def _all_gathers(cfg, mesh, fsdp_context: bool):
    """(dtype, shape without size-1 dims) of every all-gather in the compiled FSDP train step (loss + grads).

    XLA:CPU has no bf16 collectives: its float-normalization-bf16 pass rewrites every bf16 all-gather to f32 after
    partitioning, so that pass is disabled here to see the collectives GPU/TPU would run.
    """
    graphdef, params = H.init(cfg)
    tokens, segments = H.batch(cfg)
    p_sh, b_sh = state_shardings(params, mesh, fsdp=True), batch_sharding(mesh, tokens.shape)
    fn = jax.jit(jax.value_and_grad(lambda p, t, s: H.lm_loss(p, graphdef, t, s)), in_shardings=(p_sh, b_sh, b_sh))
    with jax.set_mesh(mesh), fsdp_params(fsdp_context):
        text = fn.lower(params, tokens, segments).compile(
            compiler_options={"xla_disable_hlo_passes": "float-normalization-bf16"}).as_text()
    return [(dtype, tuple(int(d) for d in dims.split(",") if d and int(d) != 1))
            for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather(?:-start)?\(", text)]


def test_fsdp_weights_are_gathered_in_bf16(mesh):
    """Under fsdp_params() every FSDP all-gather of a layer weight matrix moves bf16 (the fp32 masters are cast on
    their shards first); without it the expert weights cross the shard_map boundary in fp32. The router [D, E] and
    the LM head [D, V] stay fp32 by design."""
    cfg = H.tiny_config(hidden_size=48, intermediate_size=24, compute_dtype="bfloat16",
                        moe_implementation="expert_parallel")
    d, w, kv, f, local = 48, 32, 16, 24, cfg.num_local_experts // 4
    weights = {(d, 3 * w), (d, w), (d, kv), (w, d), (local, d, f), (local, f, d)}

    gathers = [(dtype, shape) for dtype, shape in _all_gathers(cfg, mesh, True) if shape in weights]
    assert {shape for _, shape in gathers} == weights, gathers
    assert all(dtype == "bf16" for dtype, _ in gathers), gathers
    without = [(dtype, shape) for dtype, shape in _all_gathers(cfg, mesh, False) if shape in weights]
    assert ("f32", (local, d, f)) in without, without
