"""Fused LM-head cross-entropy (``linear_cross_entropy``) against a float64 NumPy oracle: per-token NLL and the
gradients w.r.t. the hidden states and the head weight, for fp32 and bf16 activations, ``fp32=True/False`` and both
``fp32_precision`` values, chunked (custom VJP) and full (autodiff) implementations.

Tolerances are element-wise bounds on the rounding each configuration is allowed, scaled by the magnitudes that
enter each gradient element: ``S_W = |h|ᵀ|dZ|`` for dW and ``S_h = |dZ||W|ᵀ`` for dh (dZ the float64 logit
gradient), so a bound means the same thing for every element whatever its size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m1jax.losses import linear_cross_entropy

U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits): |round(x) - x| <= U_BF16 * |x|
# fp32 logits + fp32 accumulation over D = 16 and N = 24 terms: a few hundred fp32 ulps of the summed magnitudes at
# most (2^-24 * ~170); a bf16 rounding anywhere on the fp32 path is 2^-8 relative, 400x larger.
FP32_REL = 1e-5


def _oracle(h, w, targets, g):
    """float64: per-token NLL, and the gradients of sum_n g_n * nll_n w.r.t. h and w, plus the scales S_h, S_W."""
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    z = h64 @ w64
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    rows = np.arange(len(targets))
    nll = -np.log(p[rows, targets])
    dz = p.copy()
    dz[rows, targets] -= 1.0
    dz *= np.asarray(g, np.float64)[:, None]
    return nll, dz @ w64.T, h64.T @ dz, np.abs(dz) @ np.abs(w64).T, np.abs(h64).T @ np.abs(dz)


def _problem(h_dtype, vocab=100, n=24, d=16, seed=0, chunk=32):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)) * 2.0, h_dtype)  # logits of a few units: a non-trivial softmax
    w = jnp.asarray(rng.normal(size=(d, vocab)), jnp.float32)
    targets = rng.integers(0, vocab, n)
    # the first and last column of every chunk (and of the vocabulary) among the targets: off-by-one at a chunk
    # boundary would otherwise only show for the few random targets that happen to land there
    edges = sorted({c for start in range(0, vocab, chunk) for c in (start, min(start + chunk, vocab) - 1)})[:n // 2]
    targets[:len(edges)] = edges
    targets = jnp.asarray(targets, jnp.int32)
    g = jnp.asarray(rng.uniform(size=n) * (rng.uniform(size=n) > 0.3), jnp.float32)  # a loss mask times weights
    return h, w, targets, g


def _loss_and_grads(h, w, targets, g, **kw):
    """(nll, dh, dw) of sum_n g_n nll_n. The loss value returned next to the gradients (value_and_grad: the custom
    VJP's forward rule, what a train step reports) must equal the plain forward's."""
    def loss(h, w):
        return jnp.sum(g * linear_cross_entropy(h, w, targets, **kw))
    nll = jax.jit(lambda h, w: linear_cross_entropy(h, w, targets, **kw))(h, w)
    value, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(float(value), float(jnp.sum(g * nll)), rtol=1e-6)  # same fp32 sums, other order
    return nll, dh, dw


@pytest.mark.parametrize("implementation", ["chunked", "full"])
@pytest.mark.parametrize("precision", ["float32", "bf16_3x"])
@pytest.mark.parametrize("fp32", [True, False])
@pytest.mark.parametrize("h_dtype", ["float32", "bfloat16"])
def test_values_and_grads_match_float64(h_dtype, fp32, precision, implementation):
    h, w, targets, g = _problem(h_dtype)
    nll, dh, dw = _loss_and_grads(h, w, targets, g, chunk_size=32, fp32=fp32, fp32_precision=precision,
                                  implementation=implementation)
    assert nll.dtype == jnp.float32 and dh.dtype == h.dtype and dw.dtype == w.dtype
    low = h_dtype == "bfloat16" and not fp32  # the one configuration whose head runs on bf16 operands
    # The oracle multiplies the operands the head is specified to use: fp32=True -> h as given (bf16 values are exact
    # in fp32) and W in fp32; fp32=False -> both in h's dtype, so W rounded to bf16 when h is bf16.
    w_op = w.astype(h.dtype) if not fp32 else w
    ref_nll, ref_dh, ref_dw, s_h, s_w = _oracle(h, w_op, np.asarray(targets), g)
    # fp32 logits from exact (bf16 x bf16 or fp32) products: a relative 1e-6-ish error on logits of a few units
    np.testing.assert_allclose(np.asarray(nll), ref_nll, rtol=FP32_REL, atol=FP32_REL)
    # bf16-operand backward: dZ is rounded to bf16 before both matmuls (U_BF16 per element, bounded by U_BF16 * S).
    rel = FP32_REL + (U_BF16 if low else 0.0)
    # the full form's autodiff returns dW as the cotangent of W's cast to bf16: one more rounding (U_BF16 * |dW|)
    w_round = U_BF16 * np.abs(ref_dw) if low and implementation == "full" else 0.0
    err_w = np.abs(np.asarray(dw, np.float64) - ref_dw)
    assert np.all(err_w <= rel * s_w + w_round + 1e-7), f"dW error {err_w.max():.3g}, bound {(rel * s_w).max():.3g}"
    # dh is returned in h's dtype: one more rounding of the result when h is bf16 (U_BF16 * |dh|)
    out_round = U_BF16 * np.abs(ref_dh) if h_dtype == "bfloat16" else 0.0
    err_h = np.abs(np.asarray(dh, np.float64) - ref_dh)
    assert np.all(err_h <= rel * s_h + out_round + 1e-7), f"dh error {err_h.max():.3g}"


@pytest.mark.parametrize("vocab,chunk", [(96, 32), (100, 32), (50, 64), (100, 1)])  # exact, tail, one, per-column
def test_chunking_does_not_change_the_result(vocab, chunk):
    """Chunked against the full-logits form on the same inputs: only the fp32 summation order of the running
    logsumexp differs (a few ulps), and the backward writes every column exactly once."""
    h, w, targets, g = _problem("float32", vocab=vocab, chunk=chunk)
    nll, dh, dw = _loss_and_grads(h, w, targets, g, chunk_size=chunk, implementation="chunked")
    nll_f, dh_f, dw_f = _loss_and_grads(h, w, targets, g, implementation="full")
    np.testing.assert_allclose(np.asarray(nll), np.asarray(nll_f), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dh), np.asarray(dh_f), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_f), rtol=1e-5, atol=1e-6)
    ref_nll, ref_dh, ref_dw, s_h, s_w = _oracle(h, w, np.asarray(targets), g)
    np.testing.assert_allclose(np.asarray(nll), ref_nll, rtol=FP32_REL, atol=FP32_REL)
    assert np.all(np.abs(np.asarray(dw, np.float64) - ref_dw) <= FP32_REL * s_w + 1e-7)
    assert np.all(np.abs(np.asarray(dh, np.float64) - ref_dh) <= FP32_REL * s_h + 1e-7)


def test_bad_shapes():
    for h, w, t in [((2, 1, 4), (4, 5), (2,)), ((2, 4), (4,), (2,)), ((2, 4), (4, 5), (3,))]:
        with pytest.raises(ValueError, match=r"expected hidden \[N, D\]"):
            linear_cross_entropy(jnp.zeros(h), jnp.zeros(w), jnp.zeros(t, jnp.int32))
    with pytest.raises(ValueError, match="hidden width"):
        linear_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((4, 5)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="implementation"):
        linear_cross_entropy(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros((2,), jnp.int32), implementation="x")
    with pytest.raises(ValueError, match="precision"):
        linear_cross_entropy(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros((2,), jnp.int32), fp32_precision="tf16")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(jnp.zeros((2, 4)), jnp.zeros((4, 5)), jnp.zeros((2,), jnp.int32), chunk_size=0)


# --- the split-precision head ("bf16_3x_fused") -------------------------------------------------------------------
# Each fp32 operand is split into bf16 hi + lo with |x - hi - lo| <= U^2 |x|; the three kept products drop terms of at
# most 3 U^2 |a||b| (+ O(U^3)), and fp32 accumulation of the 3D exact bf16 products adds ~3D * 2^-24: 4 U^2 bounds
# both at these sizes. A plain bf16 head rounds each operand once (2 U |a||b| per product), 2 / (4 U) = 128x more.
SPLIT_REL = 4 * U_BF16 ** 2


def _split_bounds(h, w, targets, g, rel):
    """Element-wise bounds on nll, dh, dW for a head whose every product a·b has error <= rel * |a|·|b| (plus fp32
    rounding). The logits z = h W get rel * Z_n with Z_n = max_v (|h||W|)_nv; through softmax (the backward recomputes
    z and subtracts the forward's lse, both off by that much) dZ_nv moves by 2 rel Z_n |g_n| p_nv, which dh and dW
    then carry through W and h."""
    ref_nll, ref_dh, ref_dw, s_h, s_w = _oracle(h, w, targets, g)
    h64, w64 = np.abs(np.asarray(h, np.float64)), np.abs(np.asarray(w, np.float64))
    z_scale = (h64 @ w64).max(-1)                                      # Z_n
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    moved = 2 * z_scale[:, None] * np.abs(np.asarray(g, np.float64))[:, None] * p   # |dZ change| / rel
    rel = rel + FP32_REL
    return ((ref_nll, rel * 2 * z_scale + FP32_REL), (ref_dh, rel * (s_h + moved @ w64.T) + 1e-7),
            (ref_dw, rel * (s_w + h64.T @ moved) + 1e-7))


def _worst_ratio(got, ref, bound, out_round=False):
    """max |got - ref| / bound; with out_round, the bound also allows rounding the result to bf16."""
    bound = bound + (U_BF16 * np.abs(ref) if out_round else 0.0)
    return float((np.abs(np.asarray(got, np.float64) - ref) / bound).max())


@pytest.mark.parametrize("implementation", ["chunked", "full"])
@pytest.mark.parametrize("precision", ["bf16_3x_fused", "bf16_3x"])
@pytest.mark.parametrize("h_dtype", ["float32", "bfloat16"])
def test_split_head_matches_float64(h_dtype, precision, implementation):
    """The fused split head (and XLA's three-pass preset, which XLA:CPU runs in fp32) within the split bound of the
    float64 loss and gradients. fp32 h uses all three products, bf16 h (exact in bf16) two; vocab 100 in chunks of
    32 ends in a tail chunk of 4."""
    h, w, targets, g = _problem(h_dtype)
    nll, dh, dw = _loss_and_grads(h, w, targets, g, chunk_size=32, fp32=True, fp32_precision=precision,
                                  implementation=implementation)
    assert nll.dtype == jnp.float32 and dh.dtype == h.dtype and dw.dtype == w.dtype
    (ref_nll, b_nll), (ref_dh, b_dh), (ref_dw, b_dw) = _split_bounds(h, w, np.asarray(targets), g, SPLIT_REL)
    assert _worst_ratio(nll, ref_nll, b_nll) <= 1
    assert _worst_ratio(dw, ref_dw, b_dw) <= 1
    assert _worst_ratio(dh, ref_dh, b_dh, out_round=h_dtype == "bfloat16") <= 1


@pytest.mark.parametrize("implementation", ["chunked", "full"])
def test_plain_bf16_head_fails_the_split_bound(implementation):
    """The bound above is tight enough to catch a head that silently multiplies in bf16 (or drops a product): the
    plain bf16 head (both operands rounded to bf16, dZ too) on the same fp32 problem misses it by far on the loss and
    on both gradients, while the fused head sits well inside it."""
    h, w, targets, g = _problem("float32")
    bounds = _split_bounds(h, w, np.asarray(targets), g, SPLIT_REL)
    kw = dict(chunk_size=32, implementation=implementation)
    fused = _loss_and_grads(h, w, targets, g, fp32=True, fp32_precision="bf16_3x_fused", **kw)
    plain = _loss_and_grads(h.astype(jnp.bfloat16), w, targets, g, fp32=False, **kw)
    for got_fused, got_plain, (ref, bound) in zip(fused, plain, bounds):
        assert _worst_ratio(got_fused, ref, bound) <= 0.5
        assert _worst_ratio(got_plain, ref, bound) > 8
