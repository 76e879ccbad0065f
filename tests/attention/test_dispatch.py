"""What ``implementation=None`` picks per target platform, the error for a bad call, the layer's use of
``cfg.attention_implementation``, and the oracle's adjoint against finite differences."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax.config import ATTENTION_IMPLEMENTATIONS, ModelConfig
from m1jax.layers.attention import SoftmaxAttention
from pallas_kernels.attention import IMPLEMENTATIONS, Mask, attention, cudnn, default_implementation


def test_implementations_equal_the_config_choices():
    assert IMPLEMENTATIONS == ATTENTION_IMPLEMENTATIONS


def _call(tq, tk, dtype=jnp.bfloat16, mask="causal"):
    q = jax.ShapeDtypeStruct((1, tq, 4, 128), dtype)
    k = jax.ShapeDtypeStruct((1, tk, 2, 128), dtype)
    masks = {"causal": lambda: Mask.causal(1, tq), "segments": lambda: Mask.causal(1, tq, jnp.zeros((1, tq))),
             "cache": lambda: Mask.cache(jnp.int32(0), tq, tk, jnp.zeros((1,), jnp.int32)),
             "general": lambda: Mask(jnp.zeros((1, tq), jnp.int32), jnp.zeros((1, tk), jnp.int32))}
    return q, k, masks[mask]()


# (platform, Tq, Tk, dtype, mask) -> backend, with cuDNN on the host
DEFAULTS = [
    ("cpu", 64, 64, jnp.bfloat16, "causal", "xla"),
    ("cpu", 4096, 4096, jnp.bfloat16, "segments", "xla_blockwise"),
    ("cpu", 1, 8192, jnp.float32, "cache", "xla"),                    # decode: one score row per head
    ("cuda", 64, 64, jnp.bfloat16, "causal", "cudnn"),
    ("cuda", 64, 64, jnp.float16, "cache", "cudnn"),                   # prefill chunk: two calls merged
    ("cuda", 64, 64, jnp.bfloat16, "segments", "pallas_triton"),
    ("cuda", 1, 64, jnp.bfloat16, "cache", "xla"),
    ("cuda", 64, 4096, jnp.bfloat16, "general", "xla_blockwise"),      # a sequence shard: no kernel takes it
    ("cuda", 4096, 4096, jnp.float32, "causal", "xla_blockwise"),      # fp32 keeps the XLA paths
    ("rocm", 64, 64, jnp.bfloat16, "causal", "pallas_triton"),
    ("tpu", 64, 64, jnp.bfloat16, "segments", "pallas_tpu"),
    ("tpu", 64, 1024, jnp.bfloat16, "cache", "xla"),
]


@pytest.mark.parametrize("target,tq,tk,dtype,mask,want", DEFAULTS)
def test_default_implementation_per_platform(monkeypatch, target, tq, tk, dtype, mask, want):
    monkeypatch.setattr(cudnn, "native_platforms", lambda: ("cuda",))
    assert default_implementation(target, *_call(tq, tk, dtype, mask)) == want


def test_default_skips_cudnn_where_the_host_cannot_trace_it(monkeypatch):
    monkeypatch.setattr(cudnn, "native_platforms", lambda: ())
    assert default_implementation("cuda", *_call(64, 64)) == "pallas_triton"
    assert default_implementation("cuda", *_call(64, 64, mask="cache")) == "xla"


@pytest.mark.parametrize("bad,message", [
    ("rank", r"q must be \[B, Tq, H, Dh\] .*got shapes \(5, 4, 8\)"),
    ("kv", r"k and v must have the same shape .*got \(2, 5, 2, 8\) and \(2, 5, 2, 4\)"),
    ("heads", "query heads H=3 must be a multiple of KV heads Hkv=2"),
    ("slots", r"mask.q_slot must be \(2, 5\) .*got \(2, 6\)"),
    ("impl", "unknown attention implementation 'flash3'; choose from"),
])
def test_bad_calls_raise_one_line_errors(bad, message):
    q, k = jnp.zeros((2, 5, 4, 8)), jnp.zeros((2, 5, 2, 8))
    v, mask, impl = k, Mask.causal(2, 5), None
    if bad == "rank":
        q = q[0]
    elif bad == "kv":
        v = jnp.zeros((2, 5, 2, 4))
    elif bad == "heads":
        q = jnp.zeros((2, 5, 3, 8))
    elif bad == "slots":
        mask = Mask.causal(2, 6)
    else:
        impl = "flash3"
    with pytest.raises(ValueError, match=message) as raised:
        attention(q, k, v, mask, implementation=impl)
    assert "\n" not in str(raised.value)


def test_mask_needs_both_segment_arrays():
    with pytest.raises(ValueError, match="both"):
        Mask(jnp.zeros((1, 3)), jnp.zeros((1, 3)), q_segment=jnp.zeros((1, 3)))


def _config(**changes):
    return ModelConfig.tiny(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=16, num_local_experts=2,
                            num_experts_per_tok=1, rotary_dim=8, **changes)


@pytest.mark.parametrize("implementation", ["xla_blockwise", "pallas_triton", "pallas_tpu"])
def test_layer_runs_the_configured_implementation(implementation):
    """The softmax layer with packed documents: every backend that takes them gives the einsum's output."""
    layer = SoftmaxAttention(_config(attention_implementation="xla"), rngs=nnx.Rngs(0))
    h = jnp.asarray(np.random.default_rng(0).standard_normal((2, 13, 32)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(13)[None], (2, 13))
    segments = jnp.asarray([[0] * 6 + [1] * 7, [0] * 13])
    want, _ = layer(h, positions, segment_ids=segments)
    layer.cfg = _config(attention_implementation=implementation)
    got, _ = layer(h, positions, segment_ids=segments)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    layer.cfg = _config(attention_implementation="cudnn")  # no segment ids in cuDNN: the call is refused
    with pytest.raises(ValueError, match="segment ids"):
        layer(h, positions, segment_ids=segments)


def test_oracle_adjoint_matches_finite_differences(at):
    rng = np.random.default_rng(7)
    q, k, v = rng.standard_normal((1, 3, 2, 4)), rng.standard_normal((1, 5, 1, 4)), rng.standard_normal((1, 5, 1, 4))
    mask = at.mask(np.asarray([[2, 3, 4]]), np.arange(5)[None], k_valid=np.asarray([[False, True, True, True, True]]))
    d_out = rng.standard_normal((1, 3, 2, 4))
    grads = at.oracle(q, k, v, mask, d_out)
    loss = lambda q, k, v: np.sum(at.oracle(q, k, v, mask)["o"] * d_out)  # noqa: E731
    eps = 1e-6
    for name, x in (("dq", q), ("dk", k), ("dv", v)):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            hi, lo = x.copy(), x.copy()
            hi[idx] += eps
            lo[idx] -= eps
            args = {"dq": (hi, k, v), "dk": (q, hi, v), "dv": (q, k, hi)}[name]
            args_lo = {"dq": (lo, k, v), "dk": (q, lo, v), "dv": (q, k, lo)}[name]
            numeric[idx] = (loss(*args) - loss(*args_lo)) / (2 * eps)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)
