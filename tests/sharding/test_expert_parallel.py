"""Expert-parallel MoE (shard_map + all-to-all) against the dense oracle: values and gradients, dropless and dropping."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m1jax.layers.moe import _grouped_matmul, _swiglu, moe_dense, route_top_k
from sharding.expert_parallel import capacity, moe_expert_parallel
from sharding.mesh import make_mesh
from sharding.testing import assert_close_tree

N, D, F, E, K = 64, 16, 8, 8, 2
gmm = functools.partial(_grouped_matmul, implementation=None)


def _inputs(skew=False):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (N, D), jnp.float32)
    logits = jax.random.normal(keys[1], (N, E), jnp.float32) + (jnp.arange(E) * 3.0 if skew else 0.0)
    weights, experts = route_top_k(logits, K)
    w1, w3 = (0.3 * jax.random.normal(k, (E, D, F), jnp.float32) for k in keys[2:4])
    w2 = 0.3 * jax.random.normal(keys[4], (E, F, D), jnp.float32)
    return x, weights, experts, w1, w3, w2


def _loss_and_grads(moe, x, weights, experts, w1, w3, w2):
    def loss(x, weights, w1, w3, w2):
        y = moe(x, weights, experts, w1, w3, w2)
        return jnp.sum(jnp.sin(y)), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, weights, w1, w3, w2)
    return y, grads


def _ep(capacity_factor=None):
    return functools.partial(moe_expert_parallel, swiglu=_swiglu, grouped_matmul=gmm,
                             capacity_factor=capacity_factor)


@pytest.mark.parametrize("spec,skew", [(None, True), ("expert=8", True), ("data=2,expert=4", False),
                                       ("data=2,expert=2,sequence=2", True)])
def test_dropless_matches_dense(spec, skew):
    args = _inputs(skew)
    want_y, want_g = jax.jit(lambda *a: _loss_and_grads(moe_dense, *a))(*args)
    fn = jax.jit(lambda *a: _loss_and_grads(_ep(), *a))
    if spec is None:
        got_y, got_g = fn(*args)
    else:
        mesh = make_mesh(spec)
        rows = NamedSharding(mesh, P(("data", "expert", "sequence")))
        with jax.set_mesh(mesh):
            x, w, e = (jax.device_put(a, rows) for a in args[:3])
            got_y, got_g = fn(x, w, e, *args[3:])
    assert_close_tree((got_y, got_g), (want_y, want_g))  # per-leaf norm-relative error <= 1e-5


def test_capacity_factor_drops_the_overflow():
    """With a small capacity the kept assignments are the first ``cap`` per (source, destination) in token order;
    the result equals the dense oracle with the dropped assignments' weights zeroed."""
    x, weights, experts, w1, w3, w2 = _inputs(skew=True)
    mesh = make_mesh("expert=8")
    cf = 0.5
    n_local, ep = N // 8, 8
    cap = capacity(n_local, K, E, ep, cf)
    assert cap == 1
    dest = np.asarray(experts).reshape(8, n_local * K)  # expert == destination shard (1 expert per shard)
    kept = np.zeros_like(dest, bool)
    for s in range(8):
        for j in range(ep):
            idx = np.nonzero(dest[s] == j)[0][:cap]
            kept[s, idx] = True
    masked = weights * jnp.asarray(kept.reshape(N, K), weights.dtype)
    want = moe_dense(x, masked, experts, w1, w3, w2)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: _ep(cf)(*a))(x, weights, experts, w1, w3, w2)
    assert not kept.all()
    assert_close_tree(got, want)
