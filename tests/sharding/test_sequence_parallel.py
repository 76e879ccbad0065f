"""Sequence-parallel lightning and softmax attention == unsharded: outputs, final states and gradients."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pallas_kernels.attention import Mask, attention
from pallas_kernels.lightning import lightning_attention
from sharding.mesh import make_mesh
from sharding.sequence_parallel import attention_sequence_parallel, lightning_sequence_parallel
from tests.tiny_model import assert_close_tree

B, T, H, D = 2, 32, 2, 4
local = functools.partial(lightning_attention, implementation="xla_chunked", block_size=4)


def _segments(cuts):
    """[B, T] ids from per-row cut positions (a cut at a multiple of T/P lands exactly on a shard boundary)."""
    return jnp.asarray(np.stack([np.searchsorted(np.sort(c), np.arange(T), side="right") for c in cuts]), jnp.int32)


def _qkv(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks[:3])
    init = jax.random.normal(ks[3], (B, H, D, D), jnp.float32)
    return q, k, v, init, jnp.asarray([0.3, 0.05], jnp.float32)


def _grads(attend, q, k, v, init, decay, seg):
    def loss(q, k, v, init):
        o, final = attend(q, k, v, decay, initial_state=init, segment_ids=seg, return_final_state=True)
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final)), (o, final)
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, init)
    return out, grads


# Segment cuts: none; inside shards; exactly on shard boundaries (T/P = 4 at P=8, 8 at P=4); a shard with 2 cuts.
CUTS = {"none": None, "inside": [[5, 19], [11, 30]], "boundary": [[8, 16], [4, 24]], "dense": [[1, 2, 3], [29, 30, 31]]}


@pytest.mark.parametrize("spec,cuts", [("sequence=8", "none"), ("sequence=8", "boundary"), ("sequence=8", "dense"),
                                       ("data=2,sequence=4", "inside")])
def test_lightning_values_and_grads(spec, cuts):
    q, k, v, init, decay = _qkv()
    seg = None if CUTS[cuts] is None else _segments(CUTS[cuts])
    want = jax.jit(lambda *a: _grads(local, *a, decay, seg))(q, k, v, init)
    mesh = make_mesh(spec)
    sp = functools.partial(lightning_sequence_parallel, lightning_attention=local)
    with jax.set_mesh(mesh):
        x_sh = NamedSharding(mesh, P("data", "sequence"))
        got = jax.jit(lambda *a: _grads(sp, *a, decay, seg))(*(jax.device_put(a, x_sh) for a in (q, k, v)), init)
    assert_close_tree(got, want)  # (o, final state) and d(q, k, v, initial_state)


# (mesh, segment cuts, queries per block call): L = T / P = 4 on sequence=8 and 16 on sequence=2
SOFTMAX_CASES = [("sequence=8", "none", 4), ("sequence=8", "boundary", 4), ("sequence=8", "inside", 2),
                 ("data=4,sequence=2", "dense", 16), ("data=4,sequence=2", "none", 4)]


def _softmax_case(cuts, batch=4):
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (batch, T, 4, D), jnp.float32)
    k, v = (jax.random.normal(kk, (batch, T, 2, D), jnp.float32) for kk in ks[1:])
    seg = None if CUTS[cuts] is None else jnp.tile(_segments(CUTS[cuts]), (batch // B, 1))
    return q, k, v, seg


@pytest.mark.parametrize("spec,cuts,query_chunk", SOFTMAX_CASES)
@pytest.mark.parametrize("implementation", ["xla", "xla_blockwise"])
def test_softmax_ring_values_and_grads(spec, cuts, query_chunk, implementation):
    """Ring attention == the unsharded causal layer (values and d q, k, v), with packed documents, on sequence=8 and
    data=4 x sequence=2, with the shard's queries in one or several chunks; the attention function is the api's,
    as the model passes it."""
    q, k, v, seg = _softmax_case(cuts)
    attend = functools.partial(attention, implementation=implementation)

    def unsharded(q, k, v, seg):
        return attend(q, k, v, Mask.causal(q.shape[0], T, seg))

    sharded = functools.partial(attention_sequence_parallel, attention_mask=Mask, attention=attend,
                                query_chunk=query_chunk)

    def run(fn):
        loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg)))  # noqa: E731
        return jax.jit(lambda *a: (fn(*a, seg), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)

    want = run(unsharded)
    mesh = make_mesh(spec)
    with jax.set_mesh(mesh):
        x_sh = NamedSharding(mesh, P("data", "sequence"))
        got = run(lambda *a: sharded(*(jax.device_put(x, x_sh) for x in a[:3]), a[3]))
    assert_close_tree(got, want)


def test_softmax_ring_passes_blocks_instead_of_gathering_them():
    """The compiled forward and backward move K/V with collective-permutes only: no all-gather of K or V."""
    q, k, v, seg = _softmax_case("inside")
    attend = functools.partial(attention, implementation="xla")
    sharded = functools.partial(attention_sequence_parallel, attention_mask=Mask, attention=attend)
    mesh = make_mesh("sequence=8")
    with jax.set_mesh(mesh):
        loss = lambda q, k, v: jnp.sum(jnp.sin(sharded(q, k, v, seg)))  # noqa: E731
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo
