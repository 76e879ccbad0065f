"""The compiled memory plan (sharding.plan) on a small fake mesh: temporaries scale with the per-device tokens, not
with vocab x global tokens, and the plan's CPU stand-in for the grouped matmul keeps ragged_dot's values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.config import ModelConfig
from sharding.mesh import make_mesh
from sharding.plan import _grouped_matmul_group_loop, compiled_memory, kernel_like_grouped_matmul

from pallas_kernels.gmm import backends as gmm_backends


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
