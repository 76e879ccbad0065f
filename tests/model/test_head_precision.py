"""``lm_logits`` (the model's logits for generation and RL) against float64 NumPy at each fp32 head precision: the
logits and their gradients w.r.t. the hidden states and the weight (the RL update differentiates through them).

The split head (``"bf16_3x_fused"``) must stay within the split-precision bound, ``4 U^2`` times the magnitudes that
enter each element (``|h||W|`` for a logit, ``|c||W|ᵀ`` and ``|h|ᵀ|c|`` for the gradients of ``<c, logits>``), a
bound the plain bf16 head misses by far: a head that silently ran in bf16, or dropped one of the three products,
fails. XLA:CPU runs the ``bf16_3x`` preset as fp32, so here it meets the bound trivially.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.layers.embed import lm_logits

U_BF16 = 2.0 ** -8
SPLIT_REL = 4 * U_BF16 ** 2  # dropped products <= 3 U^2 |a||b|, plus fp32 accumulation of exact bf16 products


def _problem(h_dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(2, 3, 16)) * 2.0, h_dtype)
    w = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(2, 3, 40)), jnp.float32)
    return h, w, c


def _errors(h, w, c, **kw):
    """Worst |error| / (SPLIT_REL x magnitude) of logits, d<c, logits>/dh, d<c, logits>/dW at the head given by kw
    (compute dtype bf16), against float64."""
    h0, w0, c0 = (np.asarray(x, np.float64) for x in (h, w, c))
    z = jax.jit(lambda h, w: lm_logits(h, w, compute_dtype=jnp.bfloat16, **kw))(h, w)
    dh, dw = jax.jit(jax.grad(lambda h, w: jnp.sum(c * lm_logits(h, w, compute_dtype=jnp.bfloat16, **kw)),
                              argnums=(0, 1)))(h, w)
    h1, c1 = h0.reshape(-1, 16), c0.reshape(-1, 40)
    out = []
    for got, ref, mag in ((z, h0 @ w0, np.abs(h0) @ np.abs(w0)), (dh, c0 @ w0.T, np.abs(c0) @ np.abs(w0).T),
                          (dw, h1.T @ c1, np.abs(h1).T @ np.abs(c1))):
        assert got.shape == ref.shape
        # a gradient returned in bf16 (dh of bf16 h) is rounded once more: U |ref|
        extra = U_BF16 * np.abs(ref) if got.dtype == jnp.bfloat16 else 0.0
        out.append(float((np.abs(np.asarray(got, np.float64) - ref) / (SPLIT_REL * mag + extra + 1e-12)).max()))
    return out


@pytest.mark.parametrize("precision", ["bf16_3x_fused", "bf16_3x", "float32"])
@pytest.mark.parametrize("h_dtype", ["float32", "bfloat16"])
def test_fp32_heads_within_the_split_bound(h_dtype, precision):
    h, w, c = _problem(h_dtype)
    assert max(_errors(h, w, c, fp32=True, precision=precision)) <= 1


def test_plain_bf16_head_fails_the_split_bound():
    """fp32 h: the fused head sits well inside the bound on the logits and both gradients; the bf16 head (operands
    rounded to bf16) misses it on each."""
    h, w, c = _problem("float32")
    assert max(_errors(h, w, c, fp32=True, precision="bf16_3x_fused")) <= 0.5
    assert min(_errors(h, w, c, fp32=False)) > 8
