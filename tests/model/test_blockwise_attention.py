"""Blockwise (online-softmax) attention against the einsum reference: values and gradients, causal + packed segments
+ GQA + KV-cache masks, lengths that are not multiples of the blocks; and which path the layer takes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.layers import attention as A
from sharding.mesh import make_mesh
from sharding.sequence_parallel import attention_sequence_parallel
from tests.tiny_model import assert_close_tree


def _inputs(seed, b=2, tq=37, tk=37, nh=4, nkv=2, hd=8):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, nh, hd), jnp.float32)
    k, v = (jax.random.normal(kk, (b, tk, nkv, hd), jnp.float32) for kk in ks[1:])
    return q, k, v


def _slots(b, t, start=0):
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32)[None], (b, t))


def _values_and_grads(attend, q, k, v):
    loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))
    return jax.jit(lambda *a: (attend(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)


def _packed(b, t):  # row 0: two documents, cut inside a block; row 1: one
    segments = jnp.asarray([[0] * 11 + [1] * (t - 11), [5] * t])
    return A.SlotMask(_slots(b, t), _slots(b, t), segments, segments)


MASKS = {"causal": lambda b, t: A.SlotMask(_slots(b, t), _slots(b, t)), "segments": _packed}


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("blocks", [(8, 8), (16, 4), (64, 64)])
def test_blockwise_equals_einsum_self_attention(name, blocks):
    q, k, v = _inputs(0)
    mask = MASKS[name](*q.shape[:2])
    want = _values_and_grads(lambda q, k, v: A.grouped_query_attention(q, k, v, mask.dense()), q, k, v)
    got = _values_and_grads(lambda q, k, v: A.blockwise_attention(q, k, v, mask, block_q=blocks[0],
                                                                    block_k=blocks[1]), q, k, v)
    assert_close_tree(got, want, rtol=1e-5)


def test_blockwise_equals_einsum_chunk_against_cache():
    """A prefill chunk (slots 20..29) against a 45-slot cache with left padding (row 1 starts at slot 6): queries see
    valid keys up to their own slot; the cache tail past the chunk is ignored."""
    q, k, v = _inputs(1, tq=10, tk=45)
    k_slot = _slots(2, 45)
    mask = A.SlotMask(_slots(2, 10, start=20), k_slot, k_valid=k_slot >= jnp.asarray([0, 6])[:, None])
    want = _values_and_grads(lambda q, k, v: A.grouped_query_attention(q, k, v, mask.dense()), q, k, v)
    got = _values_and_grads(lambda q, k, v: A.blockwise_attention(q, k, v, mask, block_q=4, block_k=8), q, k, v)
    assert_close_tree(got, want, rtol=1e-5)


def test_rows_without_keys_give_zeros():
    q, k, v = _inputs(2, b=1, tq=8, tk=8)
    mask = A.SlotMask(_slots(1, 8), _slots(1, 8), k_valid=jnp.zeros((1, 8), bool))
    np.testing.assert_array_equal(A.blockwise_attention(q, k, v, mask, block_q=4, block_k=4), 0.0)


def test_layer_takes_blockwise_past_the_threshold(monkeypatch):
    """masked_attention: einsum up to BLOCKWISE_MIN_KEYS keys and for one-token decode, blockwise beyond."""
    calls = []
    monkeypatch.setattr(A, "blockwise_attention", lambda *a, **kw: calls.append(a[1].shape[1]) or a[0])
    monkeypatch.setattr(A, "BLOCKWISE_MIN_KEYS", 16)
    for tq, tk in ((16, 16), (1, 40), (17, 17), (4, 40)):
        q, k, v = _inputs(3, b=1, tq=tq, tk=tk)
        A.masked_attention(q, k, v, A.SlotMask(_slots(1, tq, tk - tq), _slots(1, tk)))
    assert calls == [17, 40]


def test_blockwise_memory_is_linear_in_length():
    """Compiled temporaries of value+grad at T = 1024 vs 2048 (blocks of 128) grow ~linearly, far below the
    [B, H, T, T] fp32 scores of the einsum path."""
    def temp(t):
        q, k, v = (jax.ShapeDtypeStruct((1, t, n, 32), jnp.float32) for n in (8, 2, 2))
        mask = A.SlotMask(_slots(1, t), _slots(1, t))
        fn = jax.grad(lambda q, k, v: jnp.sum(A.blockwise_attention(q, k, v, mask, block_q=128, block_k=128)),
                      argnums=(0, 1, 2))
        return jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    small, big = temp(1024), temp(2048)
    assert big < 3 * small, (small, big)
    assert big < 1 * 8 * 2048 * 2048 * 4 / 4, big  # a quarter of one score matrix


def test_sequence_parallel_blockwise_equals_einsum():
    """The 1M-prefill path: K/V all-gathered over ``sequence`` (8 shards), each shard's queries blockwise against the
    gathered keys with its global slots (SlotMask stands in for attention_mask there)."""
    q, k, v = _inputs(4, tq=64, tk=64)
    mask = _packed(2, 64)
    want = _values_and_grads(lambda q, k, v: A.grouped_query_attention(q, k, v, mask.dense()), q, k, v)
    blockwise = functools.partial(A.blockwise_attention, block_q=4, block_k=16)
    with jax.set_mesh(make_mesh("sequence=8")):
        got = _values_and_grads(lambda q, k, v: attention_sequence_parallel(
            q, k, v, mask.q_segment, attention_mask=A.SlotMask, grouped_query_attention=blockwise), q, k, v)
    assert_close_tree(got, want, rtol=1e-5)
