"""The flash-attention prefill path (cuDNN on GPU) against the einsum attention with the slot mask, run on CPU with
jax's XLA implementation of the same calls: a left-padded batch, chunk by chunk against a growing cache."""
import jax
import jax.numpy as jnp
import numpy as np

from m1jax.layers.attention import attention_mask, chunk_attention, grouped_query_attention


def test_chunk_attention_equals_masked_attention():
    rng = np.random.default_rng(0)
    b, s, h, hkv, d, t = 3, 24, 4, 2, 8, 8
    start = jnp.asarray([0, 5, 13])  # row 2's first chunk is all padding, its second chunk partly
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), jnp.float32) for n in (h, hkv, hkv))
    slots = jnp.broadcast_to(jnp.arange(s)[None], (b, s))
    run = jax.jit(lambda *a: chunk_attention(*a, implementation="xla"))
    for index in range(0, s, t):
        # the cache holds slots < index + t (the chunk included), later slots hold junk that must be ignored
        k_cache = jnp.where((slots < index + t)[..., None, None], k, 7.0)
        v_cache = jnp.where((slots < index + t)[..., None, None], v, 7.0)
        got = run(q[:, index:index + t], k[:, index:index + t], v[:, index:index + t], k_cache, v_cache,
                  jnp.int32(index), start)
        mask = attention_mask(slots[:, index:index + t], slots, k_valid=slots >= start[:, None])
        want = grouped_query_attention(q[:, index:index + t], k_cache, v_cache, mask)
        valid = np.asarray(slots[:, index:index + t] >= start[:, None])
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=0, atol=2e-6)
        np.testing.assert_array_equal(np.asarray(got)[~valid], 0.0)
