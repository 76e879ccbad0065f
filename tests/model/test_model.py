"""Whole-model properties against independent computations of the same function."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.cache import HybridCache
from m1jax.config import ModelConfig
from m1jax.model import MiniMaxM1, init_model

# initializer 0.2 gives O(1-10) logits (the default 0.02 gives near-constant ones, useless for comparisons).
CFG = ModelConfig.tiny(initializer_range=0.2, num_hidden_layers=8)
# Different fp32 reduction orders (scan vs loop, blocks, dispatch) move these logits (max |logit| ~ 6) by up to ~3e-4
# through 8 layers of random N(0, 0.2^2) weights; real bugs move them by O(1).
TOL = 5e-4
# The same for gradients, relative to each leaf's largest entry: fp32 reduction orders move them by up to 1.3e-4 of it;
# a wrong backward moves them by O(1) of it.
GRAD_TOL = 1e-3


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=1)


def _with_config(model, **changes):
    """The same parameters under a config that differs only in execution fields."""
    cfg = model.cfg.replace(**changes)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MiniMaxM1(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, shape), jnp.int32)


def test_execution_variants_compute_the_same_function(model):
    tokens = _tokens((2, 23))
    ref = model(tokens).logits
    assert ref.dtype == jnp.float32 and float(jnp.std(ref)) > 0.5
    for changes in (dict(scan_layers=False), dict(moe_implementation="dense"), dict(block_size=5),
                    dict(lightning_implementation="recurrent"), dict(remat=True)):
        got = _with_config(model, **changes)(tokens).logits
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=TOL, err_msg=str(changes))


@pytest.mark.parametrize("kernel", ["pallas_triton", "pallas_tpu"])
def test_model_with_pallas_lightning_kernel_equals_reference_path(model, kernel):
    """The Pallas kernels (interpret mode on CPU) inside the full model, with packed documents."""
    tokens = _tokens((2, 13), 6)
    segments = jnp.asarray([[0] * 6 + [1] * 7, [0] * 13])
    ref = model(tokens, segment_ids=segments).logits
    got = _with_config(model, lightning_implementation=kernel)(tokens, segment_ids=segments).logits
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=TOL)


def test_packed_documents_equal_separate_forwards(model):
    a, b = _tokens((1, 9), 1), _tokens((1, 14), 2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.asarray([[0] * 9 + [1] * 14])
    out = model(packed, segment_ids=segments).logits  # positions restart per document by default
    np.testing.assert_allclose(out[:, :9], model(a).logits, rtol=1e-4, atol=TOL)
    np.testing.assert_allclose(out[:, 9:], model(b).logits, rtol=1e-4, atol=TOL)


def test_cached_decoding_equals_full_forward(model):
    tokens = _tokens((2, 20), 3)
    full = model(tokens).logits
    cache = HybridCache.init(CFG, 2, 24, kv_dtype="float32")
    out = model(tokens[:, :11], cache=cache)  # prefill
    np.testing.assert_allclose(out.logits, full[:, :11], rtol=1e-4, atol=TOL)
    cache = out.cache
    for i in range(11, 20):
        out = model(tokens[:, i:i + 1], cache=cache)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, i], rtol=1e-4, atol=TOL)
    assert int(cache.index) == 20


def test_left_padded_row_equals_unpadded(model):
    tokens = _tokens((1, 12), 4)
    pad = 5
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), tokens], axis=1)
    cache = HybridCache.init(CFG, 1, 20, kv_dtype="float32", start=jnp.asarray([pad]))
    out = model(padded, cache=cache)
    np.testing.assert_allclose(out.logits[:, pad:], model(tokens).logits, rtol=1e-4, atol=TOL)


def test_lightning_cache_does_not_grow_with_length():
    small = HybridCache.init(CFG, 2, 64)
    large = HybridCache.init(CFG, 2, 4096)
    assert small.lightning_bytes() == large.lightning_bytes()
    assert large.kv_bytes() == 64 * small.kv_bytes()


def test_bad_inputs_are_named(model):
    with pytest.raises(ValueError, match="token ids must be in"):
        model(jnp.asarray([[1, CFG.vocab_size]]))
    with pytest.raises(ValueError, match="token ids must be in"):
        model(jnp.asarray([[-1, 2]]))
    with pytest.raises(ValueError, match="integer array"):
        model(jnp.ones((2, 3), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids must have the shape"):
        model(_tokens((2, 5)), segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="cache overflow"):
        model(_tokens((1, 9)), cache=HybridCache.init(CFG, 1, 8))


def test_jit_and_grad_through_the_model():
    # Top-k routing makes the model piecewise (an expert swap jumps the output), so finite differences need k = E:
    # then the renormalised weights are the full softmax and the function is smooth.
    model = init_model(CFG.replace(num_local_experts=2, num_experts_per_tok=2), seed=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = _tokens((2, 9), 5)

    @jax.jit
    def loss(params):
        out = nnx.merge(graphdef, params, rest)(tokens)
        return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + 1e-3 * out.aux_loss

    value, grads = jax.value_and_grad(loss)(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert np.isfinite(float(value)) and all(np.all(np.isfinite(g)) for g in leaves)
    # Directional derivatives along each parameter's own gradient direction, against central finite differences
    # (an independent computation); fp32 forward, so a coarse step and a loose bound.
    flat_p, flat_g = nnx.to_flat_state(params), nnx.to_flat_state(grads)
    checked = 0
    for (path, p), (_, g) in zip(flat_p, flat_g):
        name = ".".join(map(str, path))
        if not any(key in name for key in ("embedding", "qkv_proj", "w2", "q_proj", "lm_head", "gate")):
            continue
        d = g[...] / jnp.linalg.norm(g[...].reshape(-1))
        shifted = lambda eps: loss(nnx.from_flat_state([(q, v[...] + eps * d if q == path else v[...])
                                                       for q, v in flat_p]))
        eps = 2e-4
        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        analytic = jnp.linalg.norm(g[...].reshape(-1))
        assert abs(float(fd) - float(analytic)) <= 0.05 * float(analytic) + 2e-2, name
        checked += 1
    assert checked >= 6

    # A probe along g itself barely sees an error orthogonal to g, so every coordinate of every leaf is also compared
    # with the gradient of the same loss through the plain-autodiff paths: the dense MoE oracle (autodiff of
    # silu(gate) * up, where the sorted dispatch has hand-written backwards for the SwiGLU and its row gathers) and
    # the per-token recurrence for the lightning layers.
    oracle = _with_config(model, moe_implementation="dense", lightning_implementation="recurrent")
    oracle_graphdef, _, oracle_rest = nnx.split(oracle, nnx.Param, ...)

    @jax.jit
    def oracle_loss(params):
        out = nnx.merge(oracle_graphdef, params, oracle_rest)(tokens)
        return jnp.mean(jax.nn.logsumexp(out.logits, -1)) + 1e-3 * out.aux_loss

    want = nnx.to_flat_state(jax.grad(oracle_loss)(params))
    for (path, g), (_, w) in zip(flat_g, want):
        w = np.asarray(w[...])
        np.testing.assert_allclose(np.asarray(g[...]), w, rtol=0, atol=GRAD_TOL * np.abs(w).max() + 1e-7,
                                   err_msg=".".join(map(str, path)))
