"""Layers against NumPy implementations of M1's definitions (RoPE, decays, routing, aux loss) and the dense MoE
oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.config import ModelConfig
from m1jax.layers.attention import apply_rope
from m1jax.layers.lightning import _silu_fp32, alibi_slopes, decay_rates
from m1jax.layers.moe import (MoE, _combine, _gather_rows, _router_logits, _swiglu, aux_loss_from_stats,
                              load_balancing_stats, moe_dense, moe_sorted, route_top_k)
from m1jax.layers.norms import RMSNorm


def rope_numpy(x, positions, rotary_dim, theta):
    """NeoX partial RoPE written out: pairs (i, i + r/2) inside the first r dims, inv_freq_i = theta^(-2i/r)."""
    x = np.asarray(x, np.float64)
    out = x.copy()
    half = rotary_dim // 2
    for i in range(half):
        freq = theta ** (-2.0 * i / rotary_dim)
        ang = np.asarray(positions, np.float64)[:, :, None] * freq  # [B, T, 1]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * np.cos(ang) - b * np.sin(ang)
        out[..., i + half] = b * np.cos(ang) + a * np.sin(ang)
    return out


@pytest.mark.parametrize("rotary_dim", [0, 8, 16])
def test_partial_rope_matches_numpy(rotary_dim):
    rng = np.random.default_rng(rotary_dim)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 512, (2, 7))  # fp32 angles: keep |angle| small for a tight bound
    got = apply_rope(jnp.asarray(x), jnp.asarray(pos), rotary_dim, 1e7)
    np.testing.assert_allclose(np.asarray(got), rope_numpy(x, pos, rotary_dim, 1e7), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(got)[..., rotary_dim:], x[..., rotary_dim:])  # pass-through dims


def test_m1_decay_constants_match_the_formula():
    """lambda_{l,h} = exp(-2^(-8(h+1)/H) (1 - l/(L-1) + 1e-5)) for M1 (H=64, L=80; docs/model.md §3.2), in float64."""
    slopes = np.array(alibi_slopes(64))
    np.testing.assert_allclose(slopes, 2.0 ** (-(np.arange(64) + 1) / 8), rtol=1e-12)
    heads = np.arange(64)
    for layer in (0, 40, 78, 79):
        want = np.exp(-(2.0 ** (-8.0 * (heads + 1) / 64)) * (1.0 - layer / 79 + 1e-5))
        got = np.exp(-np.asarray(decay_rates(64, layer, 80), np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-6)  # decay_rates is fp32: 1e-6 is a few fp32 ulps of s
    # The published description's rounded range for layer 0 (lambda in [0.3997, 0.9961]) as a sanity anchor.
    lam0 = np.exp(-np.asarray(decay_rates(64, 0, 80), np.float64))
    assert round(lam0.min(), 4) == 0.3997 and round(lam0.max(), 4) == 0.9961


def test_alibi_slopes_non_power_of_two_interleave():
    # MiniMax/vLLM rule for H=6: the 4 power-of-two slopes, then every other slope of the H=8 list.
    expected = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8] + [2 ** -1, 2 ** -3]
    np.testing.assert_allclose(alibi_slopes(6), expected, rtol=1e-12)


def test_rmsnorm_fp32_statistics():
    norm = RMSNorm(8, 1e-5, rngs=nnx.Rngs(0))
    norm.weight[...] = jnp.arange(1, 9, dtype=jnp.float32)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32) * 100
    want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * np.arange(1, 9)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5)


def test_routing_is_softmax_top_k_renormalised():
    logits = np.random.default_rng(1).standard_normal((11, 6)).astype(np.float32)
    weights, experts = route_top_k(jnp.asarray(logits), 2)
    top = np.argsort(-logits, axis=1)[:, :2]
    np.testing.assert_array_equal(np.sort(np.asarray(experts), 1), np.sort(top, 1))
    sel = np.take_along_axis(logits, np.asarray(experts), 1).astype(np.float64)
    want = np.exp(sel) / np.exp(sel).sum(1, keepdims=True)  # softmax over the selected logits
    np.testing.assert_allclose(np.asarray(weights), want, rtol=1e-5)


def test_aux_loss_matches_transformers_formula():
    """transformers' load_balancing_loss_func over the concatenation of every layer's router logits."""
    rng = np.random.default_rng(2)
    layers, n, e, k = 3, 10, 4, 2
    logits = rng.standard_normal((layers, n, e)).astype(np.float32)
    f_sum, p_sum = np.zeros((k, e)), np.zeros(e)
    for l in range(layers):
        _, experts = route_top_k(jnp.asarray(logits[l]), k)
        f, p = load_balancing_stats(jnp.asarray(logits[l]), experts, e)
        f_sum, p_sum = f_sum + f, p_sum + p
    got = float(aux_loss_from_stats(jnp.asarray(f_sum), jnp.asarray(p_sum), layers, e))
    cat = logits.reshape(-1, e).astype(np.float64)
    probs = np.exp(cat) / np.exp(cat).sum(1, keepdims=True)
    sel = np.argsort(-probs, 1)[:, :k]
    mask = np.eye(e)[sel]  # [N, k, E]
    want = e * np.sum(mask.mean(0) * probs.mean(0)[None])
    assert abs(got - want) < 1e-5
    uniform = aux_loss_from_stats(*load_balancing_stats(jnp.zeros((n, e)), jnp.asarray(sel[:n]), e), 1, e)
    assert abs(float(uniform) - k) < 1e-6  # perfectly balanced probabilities give top_k


def test_sorted_dispatch_equals_dense_oracle_values_and_grads():
    rng = np.random.default_rng(3)
    n, d, f, e, k = 13, 8, 12, 5, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    w1, w3 = (jnp.asarray(rng.standard_normal((e, d, f)) * 0.3, jnp.float32) for _ in range(2))
    w2 = jnp.asarray(rng.standard_normal((e, f, d)) * 0.3, jnp.float32)
    # Skew routing so that one expert gets nothing and another gets most tokens.
    logits = jnp.asarray(rng.standard_normal((n, e)) + np.array([3.0, 0, 0, 0, -9.0]), jnp.float32)
    weights, experts = route_top_k(logits, k)
    assert 4 not in np.asarray(experts)

    def loss(fn, x, w1, w3, w2):
        return jnp.sum(jnp.sin(fn(x, weights, experts, w1, w3, w2)))

    args = (x, w1, w3, w2)
    np.testing.assert_allclose(moe_sorted(x, weights, experts, w1, w3, w2),
                               moe_dense(x, weights, experts, w1, w3, w2), rtol=1e-5, atol=1e-5)
    g_sorted = jax.grad(lambda *a: loss(moe_sorted, *a), argnums=(0, 1, 2, 3))(*args)
    g_dense = jax.grad(lambda *a: loss(moe_dense, *a), argnums=(0, 1, 2, 3))(*args)
    for gs, gd in zip(g_sorted, g_dense):
        np.testing.assert_allclose(gs, gd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 1e-2), (jnp.float32, 1e-6)])
def test_swiglu_custom_gradient_matches_autodiff(dtype, tol):
    """The hand-written backward of the fused SwiGLU against autodiff of silu(gate) * up on the same values in fp32;
    the forward is the fp32 product in the inputs' dtype. bf16: the gradients are rounded to bf16 (a few ulps);
    fp32 (the dtype the MoE oracle comparisons run in): to fp32 rounding."""
    rng = np.random.default_rng(5)
    gate, up, dh = (jnp.asarray(rng.standard_normal((9, 24)) * 3, dtype) for _ in range(3))
    out, vjp = jax.vjp(_swiglu, gate, up)
    plain = lambda g, u: jax.nn.silu(g) * u
    want, want_vjp = jax.vjp(plain, gate.astype(jnp.float32), up.astype(jnp.float32))
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want.astype(dtype)))
    for got, ref in zip(vjp(dh), want_vjp(dh.astype(jnp.float32))):
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=tol, atol=tol)


def _rematerialised_cases():
    """(name, rematerialised function, plain expression, differentiable args, other args): the layers' fp32 chains
    on bf16 activations whose backward keeps only their inputs."""
    rng = np.random.default_rng(11)
    n, k, d, e = 64, 2, 32, 4
    bf16 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
    silu = lambda x: jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)  # noqa: E731
    router = lambda x, gate: jnp.einsum("nd,de->ne", x.astype(jnp.float32), gate,  # noqa: E731
                                        precision=jax.lax.Precision.HIGHEST)
    order = jnp.asarray(rng.permutation(n * k), jnp.int32)
    position = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32))

    def combine(ys, weights, position, order):
        y_slots = _gather_rows(ys, position, order).reshape(n, k, -1)
        return jnp.einsum("nkd,nk->nd", y_slots.astype(jnp.float32), weights.astype(jnp.float32))

    return [("silu_fp32", _silu_fp32, silu, (bf16(n, 3 * d),), ()),
            ("router_logits", _router_logits, router, (bf16(n, d), jnp.asarray(rng.standard_normal((d, e)),
                                                                            jnp.float32)), ()),
            ("combine", lambda ys, w, p, o: _combine(ys, p, o, w), combine, (bf16(n * k, d), bf16(n, k)),
             (position, order))]


@pytest.mark.parametrize("case", _rematerialised_cases(), ids=lambda c: c[0])
def test_rematerialised_chains_equal_autodiff_and_keep_only_their_inputs(case):
    """Each fp32 chain over a bf16 activation gives the plain expression's value and gradients, and its VJP holds
    only its inputs. Autodiff of the plain expression holds fp32 copies (sigmoid(x), x upcast, the gathered rows
    upcast): a layer scan stacks those for every layer (16 GiB of the scanned m1-1b step at 4 x 8K for the SiLU)."""
    _, fn, plain, diff_args, other_args = case
    out, vjp = jax.vjp(lambda *a: fn(*a, *other_args), *diff_args)
    want, want_vjp = jax.vjp(lambda *a: plain(*a, *other_args), *diff_args)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(out.shape), out.dtype)
    for got, ref in zip(vjp(cotangent), want_vjp(cotangent)):
        assert got.dtype == ref.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=1e-6, atol=1e-6)
    nbytes = lambda tree: sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))  # noqa: E731
    inputs = nbytes((diff_args, other_args))
    assert nbytes(vjp) <= inputs + 64, (nbytes(vjp), inputs)
    assert nbytes(want_vjp) > 1.5 * inputs  # the check bites: the plain expression keeps fp32 copies


def test_moe_layer_against_numpy_per_token_loop():
    cfg = ModelConfig.tiny(initializer_range=0.3)
    layer = MoE(cfg, rngs=nnx.Rngs(4))
    h = np.random.default_rng(4).standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
    y, _, _ = layer(jnp.asarray(h))
    gate, w1, w2, w3 = (np.asarray(p[...], np.float64) for p in (layer.gate, layer.w1, layer.w2, layer.w3))
    want = np.zeros_like(h, dtype=np.float64)
    for b in range(2):
        for t in range(5):
            x = h[b, t].astype(np.float64)
            logit = x @ gate
            p = np.exp(logit - logit.max()); p /= p.sum()
            top = np.argsort(-p)[:2]
            wts = p[top] / p[top].sum()
            for e, w in zip(top, wts):
                a = x @ w1[e]
                want[b, t] += w * ((a / (1 + np.exp(-a)) * (x @ w3[e])) @ w2[e])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
