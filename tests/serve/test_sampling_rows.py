"""m1jax.generate's per-row sampling rules (the continuous engine's batches mix requests with different
settings) against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np

from m1jax import generate as gen


def _filter_numpy(row, temperature, top_k, top_p):
    """logits / T, keep the top_k largest, then the smallest prefix with mass >= top_p; float64."""
    row = row.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    order = np.argsort(-row, kind="stable")
    kept = order[:top_k] if top_k > 0 else order
    p = np.exp(row[kept] - row[kept].max())
    p /= p.sum()
    kept = kept[((np.cumsum(p) - p) < top_p) | (np.arange(len(kept)) == 0)]
    out = np.full_like(row, -np.inf)
    out[kept] = row[kept]
    return out


def test_per_row_sampling_filters_against_numpy():
    settings = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.0, 3, 0.5)]
    logits = np.random.default_rng(1).normal(0, 2, (len(settings), 64)).astype(np.float32)
    sampling = gen.Sampling.rows(*zip(*settings))
    got = np.asarray(jax.jit(gen.filter_logits)(jnp.asarray(logits), sampling))
    for row, (t, k, p) in enumerate(settings):
        want = _filter_numpy(logits[row], t, k, p)
        np.testing.assert_array_equal(np.isfinite(got[row]), np.isfinite(want))
        np.testing.assert_allclose(got[row][np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)


def test_static_filtering_variants_equal_the_device_decided_one_and_have_no_branch():
    """``active`` True / False (the engine's static variants) give what ``active=None`` (a ``lax.cond`` on the
    device) gives, bit for bit: a batch where some rows filter takes the filtering branch, one where none does the
    other; a static variant's program has no cond (whose predicate a GPU runtime reads back mid-program)."""
    logits = jnp.asarray(np.random.default_rng(3).normal(0, 2, (4, 64)), jnp.float32)
    mixed = gen.Sampling.rows([1.0, 0.7, 0.0, 1.3], [0, 5, 0, 0], [1.0, 1.0, 1.0, 0.8])
    plain = gen.Sampling.rows([1.0, 0.7, 0.0, 1.3], [0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0])
    for sampling, active in ((mixed, True), (plain, False)):
        decided = np.asarray(jax.jit(gen.filter_logits)(logits, sampling))
        static = jax.jit(gen.filter_logits, static_argnums=2)
        np.testing.assert_array_equal(np.asarray(static(logits, sampling, active)), decided)
        for row, (t, k, p) in enumerate(zip(*(np.asarray(x) for x in (sampling.temperature, sampling.top_k,
                                                                      sampling.top_p)))):
            want = _filter_numpy(np.asarray(logits[row]), t, k, p)
            np.testing.assert_array_equal(np.isfinite(decided[row]), np.isfinite(want))
        assert "cond" not in str(jax.make_jaxpr(gen.filter_logits, static_argnums=2)(logits, sampling, active))
    assert "cond" in str(jax.make_jaxpr(gen.filter_logits)(logits, mixed))


def test_per_row_keys_make_each_row_independent_of_the_batch():
    logits = jnp.asarray(np.random.default_rng(2).normal(0, 1, (5, 32)), jnp.float32)
    sampling = gen.Sampling.rows([1.0, 0.0, 0.8, 1.0, 1.5], [0, 0, 4, 0, 0], [1.0, 1.0, 1.0, 0.7, 1.0])
    keys = jax.random.split(jax.random.key(7), 5)
    tokens, _, model_logp, _ = jax.jit(gen.sample_tokens)(keys, logits, sampling)
    for row in range(5):
        alone = gen.Sampling(*(x[row:row + 1] for x in (sampling.temperature, sampling.top_k, sampling.top_p)))
        token, _, logp, _ = gen.sample_tokens(keys[row:row + 1], logits[row:row + 1], alone)
        assert int(token[0]) == int(tokens[row])
        np.testing.assert_allclose(float(logp[0]), float(jax.nn.log_softmax(logits[row])[tokens[row]]), atol=1e-6)
    assert int(tokens[1]) == int(jnp.argmax(logits[1]))  # temperature 0: greedy
