"""Chunked LM-head cross-entropy against the plain full-logits form and a float64 NumPy oracle (values and grads)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.losses import linear_cross_entropy


def _oracle(h, w, targets):
    """float64 NumPy: per-token NLL and its gradients wrt h and w for the loss sum_n g_n * nll_n."""
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    z = h64 @ w64
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    nll = -np.log(p[np.arange(len(targets)), targets])
    return nll, p


# "bf16_3x" is XLA's three-pass bf16 algorithm on GPU; XLA:CPU runs it as fp32, so the oracle bound is the same here
# (this checks that the precision reaches the forward and the custom backward of both implementations).
@pytest.mark.parametrize("precision", ["float32", "bf16_3x"])
@pytest.mark.parametrize("vocab,chunk", [(96, 32), (100, 32), (50, 64)])  # exact chunks, a tail chunk, one chunk
def test_chunked_matches_oracle_and_full(vocab, chunk, precision):
    rng = np.random.default_rng(0)
    n, d = 24, 16
    h = jnp.asarray(rng.normal(size=(n, d)) * 2.0, jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, n), jnp.int32)
    g = jnp.asarray(rng.uniform(size=n) * (rng.uniform(size=n) > 0.3), jnp.float32)  # a loss mask / weights

    nll = linear_cross_entropy(h, w, targets, chunk_size=chunk, fp32_precision=precision)
    ref_nll, p = _oracle(h, w, np.asarray(targets))
    np.testing.assert_allclose(np.asarray(nll), ref_nll, rtol=1e-5, atol=1e-5)

    def loss(impl):
        return lambda h, w: jnp.sum(g * linear_cross_entropy(h, w, targets, chunk_size=chunk, implementation=impl,
                                                                     fp32_precision=precision))

    dh, dw = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1)))(h, w)
    dh_full, dw_full = jax.grad(loss("full"), argnums=(0, 1))(h, w)
    onehot = np.eye(vocab)[np.asarray(targets)]
    dz = (p - onehot) * np.asarray(g, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(dh), dz @ np.asarray(w, np.float64).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(h, np.float64).T @ dz, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(dh_full), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_full), rtol=1e-5, atol=1e-6)


def test_bf16_hidden_fp32_head():
    """bf16 activations with fp32=True: the head runs on fp32 operands; dh comes back in bf16, dW in fp32."""
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 40, 8), jnp.int32)
    nll = linear_cross_entropy(h, w, t, chunk_size=16)
    ref, _ = _oracle(np.asarray(h.astype(jnp.float32)), w, np.asarray(t))
    np.testing.assert_allclose(np.asarray(nll), ref, rtol=1e-5, atol=1e-5)
    dh, dw = jax.grad(lambda h, w: linear_cross_entropy(h, w, t, chunk_size=16).sum(), argnums=(0, 1))(h, w)
    assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32


def test_bad_shapes():
    with pytest.raises(ValueError, match="hidden width"):
        linear_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((4, 5)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        linear_cross_entropy(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros((2,), jnp.int32), implementation="x")
    with pytest.raises(ValueError, match="precision"):
        linear_cross_entropy(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros((2,), jnp.int32), fp32_precision="tf16")
