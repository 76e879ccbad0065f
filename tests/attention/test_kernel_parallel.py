"""Attention under a mesh (8 CPU devices): ``sharding.kernel_parallel.attention_batch_head_parallel`` runs the kernel
per device on its batch rows and heads, and equals the unsharded call (values and gradients)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import Mask, attention
from sharding.kernel_parallel import attention_batch_head_parallel
from sharding.mesh import make_mesh
from tests.tiny_model import assert_close_tree

B, T, H, DH = 4, 24, 4, 16


def _inputs(nkv, tk=T):
    rng = np.random.default_rng(nkv)
    q = jnp.asarray(rng.standard_normal((B, T, H, DH)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, tk, nkv, DH)), jnp.float32) for _ in range(2))
    return q, k, v


MASKS = {"segments": lambda: Mask.causal(B, T, jnp.asarray(np.repeat([[0] * 10 + [1] * 14], B, 0))),
         "cache": lambda: Mask.cache(jnp.int32(8), T, 40, jnp.asarray([0, 3, 9, 20]))}
CASES = [("pallas_triton", "segments", 2), ("xla", "cache", 2), ("xla", "segments", 1)]


def _values_and_grads(attend, q, k, v, mask):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask)))  # noqa: E731
    return jax.jit(lambda *a: (attend(*a, mask), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)


def _local_q_shape(attend, q, k, v, mask):
    """Shape of q inside the shard_map (what each device's kernel sees)."""
    eqn = next(e for e in jax.make_jaxpr(attend)(q, k, v, mask).eqns if e.primitive.name == "shard_map")
    return tuple(eqn.params["jaxpr"].invars[0].aval.shape)


@pytest.mark.parametrize("implementation,mask,nkv", CASES)
def test_batch_head_parallel_equals_unsharded(implementation, mask, nkv):
    mask = MASKS[mask]()
    q, k, v = _inputs(nkv, tk=mask.k_slot.shape[1])
    attend = functools.partial(attention, implementation=implementation)
    want = _values_and_grads(attend, q, k, v, mask)
    sharded = functools.partial(attention_batch_head_parallel, attention=attend)
    with jax.set_mesh(make_mesh("data=2,expert=2,tensor=2")):  # batch over data x expert, heads over tensor
        got = _values_and_grads(sharded, q, k, v, mask)
        local = _local_q_shape(sharded, q, k, v, mask)
    assert_close_tree(got, want, rtol=1e-5)
    # heads split only when the KV heads split alike (one KV head cannot be split over two devices)
    assert local == (B // 4, T, H // 2 if nkv == 2 else H, DH)
