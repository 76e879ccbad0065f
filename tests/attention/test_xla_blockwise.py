"""Blockwise (online-softmax) attention beyond the shared base: results independent of the block sizes (causal and
packed segments, a cache chunk, lengths that are not multiples of the blocks), memory linear in the length, and
the sequence-parallel path (K/V all-gathered over 8 shards) with the blockwise function inside."""
import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.attention import Mask, reference, xla_blockwise
from sharding.mesh import make_mesh
from sharding.sequence_parallel import attention_sequence_parallel
from tests.tiny_model import assert_close_tree


def _inputs(seed, b=2, tq=37, tk=37, nh=4, nkv=2, hd=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, nh, hd), jnp.float32)
    k, v = (jax.random.normal(kk, (b, tk, nkv, hd), jnp.float32) for kk in ks[1:])
    return q, k, v


def _values_and_grads(attend, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))  # noqa: E731
    return jax.jit(lambda *a: (attend(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)


def _packed(b, t):  # row 0: two documents, cut inside a block; row 1: one
    return Mask.causal(b, t, jnp.asarray([[0] * 11 + [1] * (t - 11), [5] * t]))


MASKS = {"causal": lambda b, t: Mask.causal(b, t), "segments": _packed}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("blocks", [(8, 8), (16, 4), (64, 64)])
def test_blockwise_equals_einsum_self_attention(name, blocks):
    q, k, v = _inputs(0)
    mask = MASKS[name](*q.shape[:2])
    want = _values_and_grads(lambda q, k, v: reference.attention(q, k, v, mask), q, k, v)
    got = _values_and_grads(lambda q, k, v: xla_blockwise.attention(q, k, v, mask, block_q=blocks[0],
                                                                    block_k=blocks[1]), q, k, v)
    assert_close_tree(got, want, rtol=1e-5)


def test_blockwise_equals_einsum_chunk_against_cache():
    """A prefill chunk (slots 20..29) against a 45-slot cache with left padding (row 1 starts at slot 6): queries see
    valid keys up to their own slot; the cache tail past the chunk is ignored."""
    q, k, v = _inputs(1, tq=10, tk=45)
    mask = Mask.cache(jnp.int32(20), 10, 45, jnp.asarray([0, 6]))
    want = _values_and_grads(lambda q, k, v: reference.attention(q, k, v, mask), q, k, v)
    got = _values_and_grads(lambda q, k, v: xla_blockwise.attention(q, k, v, mask, block_q=4, block_k=8), q, k, v)
    assert_close_tree(got, want, rtol=1e-5)


def test_blockwise_memory_is_linear_in_length():
    """Compiled temporaries of value+grad at T = 1024 vs 2048 (blocks of 128) grow ~linearly, far below the
    [B, H, T, T] fp32 scores of the einsum path."""
    def temp(t):
        q, k, v = (jax.ShapeDtypeStruct((1, t, n, 32), jnp.float32) for n in (8, 2, 2))
        fn = jax.grad(lambda q, k, v: jnp.sum(xla_blockwise.attention(q, k, v, Mask.causal(1, t), block_q=128,
                                                                      block_k=128)), argnums=(0, 1, 2))
        return jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    small, big = temp(1024), temp(2048)
    assert big < 3 * small, (small, big)
    assert big < 1 * 8 * 2048 * 2048 * 4 / 4, big  # a quarter of one score matrix


def test_sequence_parallel_blockwise_equals_einsum():
    """The 1M-prefill path: ring attention over ``sequence`` (8 shards), each shard's queries blockwise against each
    K/V block passed around the ring, at their global slots (``Mask`` is the mask builder there), merged by their
    logsumexps."""
    q, k, v = _inputs(4, tq=64, tk=64)
    mask = _packed(2, 64)
    want = _values_and_grads(lambda q, k, v: reference.attention(q, k, v, mask), q, k, v)
    blockwise = functools.partial(xla_blockwise.attention, block_q=4, block_k=16)
    with jax.set_mesh(make_mesh("sequence=8")):
        got = _values_and_grads(lambda q, k, v: attention_sequence_parallel(
            q, k, v, mask.q_segment, attention_mask=Mask, attention=blockwise), q, k, v)
    assert_close_tree(got, want, rtol=1e-5)
