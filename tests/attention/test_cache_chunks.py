"""Chunked prefill of a left-padded batch, chunk by chunk against a growing KV cache (later slots hold junk), on
every backend that takes a KV cache: each chunk's output equals the float64 oracle's, and padded queries give zeros.
cuDNN's two-call merge runs through jax's XLA stand-in here (bf16)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import Mask, attention

TOLERANCE = {"xla": 1e-5, "xla_blockwise": 1e-5, "cudnn": 2e-2}


@pytest.mark.parametrize("impl", sorted(TOLERANCE))
def test_chunks_against_a_growing_cache_equal_the_oracle(impl, at):
    rng = np.random.default_rng(0)
    b, s, h, hkv, d, t = 3, 24, 4, 2, 8, 8
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
    start = np.asarray([0, 5, 13])  # row 2's first chunk is all padding, its second chunk partly
    q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, d)), dtype) for n in (h, hkv, hkv))
    slots = np.broadcast_to(np.arange(s)[None], (b, s))
    run = jax.jit(lambda q, k, v, mask: attention(q, k, v, mask, implementation=impl))
    for index in range(0, s, t):
        # the cache holds slots < index + t (the chunk included), later slots hold junk that must be ignored
        filled = jnp.asarray(slots < index + t)[..., None, None]
        k_cache, v_cache = jnp.where(filled, k, 7.0), jnp.where(filled, v, 7.0)
        got = run(q[:, index:index + t], k_cache, v_cache, Mask.cache(jnp.int32(index), t, s, jnp.asarray(start)))
        dense = at.mask(slots[:, index:index + t], slots, k_valid=slots >= start[:, None])
        want = at.oracle(*(np.asarray(x.astype(jnp.float32), np.float64) for x in
                           (q[:, index:index + t], k_cache, v_cache)), dense)["o"]
        valid = slots[:, index:index + t] >= start[:, None]
        got = np.asarray(got.astype(jnp.float32))
        assert at.rel_err(got[valid], want[valid]) < TOLERANCE[impl]
        np.testing.assert_array_equal(got[~valid], 0.0)
