"""The attention kernels lower for the platform being compiled for, not the host: ``jax.export`` on CPU for tpu and
cuda, forward and backward, finds each kernel's custom call; the same jitted function executed on CPU gives the
oracle's values.

cuDNN: jax's wrapper reads the cuDNN version from jax's CUDA plugin when it traces the call, and this host has no
plugin, so a stub version stands in (``cudnn_on_host``); the lowering itself needs no GPU. Without it the default for
cuda is the Triton kernel, which is checked too.
"""
from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.attention import Mask, attention
from pallas_kernels.compat import TPU_CALL_TARGET, TRITON_CALL_TARGET

B, T, H, HKV, DH = 1, 256, 4, 2, 128
CUDNN_FWD, CUDNN_BWD = "__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"
CHECKS = [export.DisabledSafetyCheck.custom_call(t) for t in (TRITON_CALL_TARGET, CUDNN_FWD, CUDNN_BWD)]


@pytest.fixture
def cudnn_on_host(monkeypatch):
    from jax._src.cudnn import fused_attention_stablehlo

    class Version:
        @staticmethod
        def cudnn_get_version():
            return 91000

    monkeypatch.setattr(fused_attention_stablehlo, "cuda_versions", Version)


def _weights(shape):
    """Fixed cotangent of the test losses: loss = sum(o * w), so d loss / d o = w."""
    return jnp.cos(jnp.arange(np.prod(shape), dtype=jnp.float32)).reshape(shape)


def _sequence(implementation, segments: bool):
    """(forward, value-and-grad) of causal attention [with segment ids], jitted, on args (q, k, v, segment_ids)."""
    def forward(q, k, v, seg):
        return attention(q, k, v, Mask.causal(q.shape[0], q.shape[1], seg if segments else None),
                         implementation=implementation)

    def grad(q, k, v, seg):
        loss = lambda q, k, v: jnp.sum(forward(q, k, v, seg).astype(jnp.float32) * _weights(q.shape))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    return jax.jit(forward), jax.jit(grad)


def _cache(implementation):
    """(forward, value-and-grad) of a T-query chunk at slot 256 against a 3T-slot cache (left padding), jitted."""
    def forward(q, k, v, start):
        return attention(q, k, v, Mask.cache(jnp.int32(T), T, 3 * T, start), implementation=implementation)

    def grad(q, k, v, start):
        loss = lambda q, k, v: jnp.sum(forward(q, k, v, start).astype(jnp.float32) * _weights(q.shape))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    return jax.jit(forward), jax.jit(grad)


def _sequence_args():
    sds = jax.ShapeDtypeStruct
    return (sds((B, T, H, DH), jnp.bfloat16), sds((B, T, HKV, DH), jnp.bfloat16), sds((B, T, HKV, DH), jnp.bfloat16),
            sds((B, T), jnp.int32))


def _cache_args():
    sds = jax.ShapeDtypeStruct
    return (sds((B, T, H, DH), jnp.bfloat16), sds((B, 3 * T, HKV, DH), jnp.bfloat16),
            sds((B, 3 * T, HKV, DH), jnp.bfloat16), sds((B,), jnp.int32))


def _custom_calls(fn, target_platform, args) -> Counter:
    if target_platform == "cuda":  # Triton's lowering asks for the GPU model; an abstract one stands in
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
            text = export.export(fn, platforms=(target_platform,), disabled_checks=CHECKS)(*args).mlir_module()
    else:
        text = export.export(fn, platforms=(target_platform,), disabled_checks=CHECKS)(*args).mlir_module()
    return Counter(re.findall(r"custom_call @([\w$.]+)\(", text) + re.findall(r'call_target_name = "([^"]+)"', text))


def _calls(counter: Counter, *targets) -> tuple[int, ...]:
    return tuple(counter[t] for t in targets)


@pytest.mark.parametrize("segments", [False, True])
def test_default_lowers_splash_for_tpu(segments):
    forward, grad = _sequence(None, segments)
    assert _calls(_custom_calls(forward, "tpu", _sequence_args()), TPU_CALL_TARGET) == (1,)
    assert _calls(_custom_calls(grad, "tpu", _sequence_args()), TPU_CALL_TARGET) == (3,)  # forward, dq, dkv


@pytest.mark.parametrize("segments", [False, True])
def test_default_lowers_triton_for_cuda_without_cudnn_on_the_host(segments):
    forward, grad = _sequence(None, segments)
    assert _calls(_custom_calls(forward, "cuda", _sequence_args()), TRITON_CALL_TARGET) == (1,)
    assert _calls(_custom_calls(grad, "cuda", _sequence_args()), TRITON_CALL_TARGET) == (3,)  # forward, dq, dkv


def test_default_lowers_cudnn_for_cuda(cudnn_on_host):
    forward, grad = _sequence(None, segments=False)
    targets = (CUDNN_FWD, CUDNN_BWD, TRITON_CALL_TARGET)
    assert _calls(_custom_calls(forward, "cuda", _sequence_args()), *targets) == (1, 0, 0)
    assert _calls(_custom_calls(grad, "cuda", _sequence_args()), *targets) == (1, 1, 0)
    # packed documents: cuDNN has no segment ids, the Triton kernel takes them
    forward, grad = _sequence(None, segments=True)
    assert _calls(_custom_calls(grad, "cuda", _sequence_args()), *targets) == (0, 0, 3)


def test_default_cache_chunk_is_two_cudnn_calls_for_cuda_and_xla_for_tpu(cudnn_on_host):
    forward, grad = _cache(None)
    assert _calls(_custom_calls(forward, "cuda", _cache_args()), CUDNN_FWD, CUDNN_BWD) == (2, 0)
    # the backward of the merge is the blockwise XLA path's (cuDNN's backward drops the logsumexp cotangent)
    assert _calls(_custom_calls(grad, "cuda", _cache_args()), CUDNN_FWD, CUDNN_BWD) == (2, 0)
    assert _calls(_custom_calls(grad, "tpu", _cache_args()), TPU_CALL_TARGET) == (0,)


@pytest.mark.parametrize("implementation,target_platform,target", [
    ("pallas_tpu", "tpu", TPU_CALL_TARGET), ("pallas_triton", "cuda", TRITON_CALL_TARGET),
    ("cudnn", "cuda", CUDNN_BWD)])
def test_explicit_kernel_lowers_for_its_platform(cudnn_on_host, implementation, target_platform, target):
    _, grad = _sequence(implementation, segments=implementation != "cudnn")
    assert _custom_calls(grad, target_platform, _sequence_args())[target] >= 1


def test_explicit_kernel_cannot_lower_for_another_platform():
    forward, _ = _sequence("pallas_tpu", segments=False)
    with pytest.raises(NotImplementedError, match="platform_index"):
        _custom_calls(forward, "cuda", _sequence_args())


@pytest.mark.parametrize("segments", [False, True])
def test_the_same_jitted_function_runs_the_xla_path_on_cpu(segments, at):
    """The function exported above, executed here (cpu): the XLA path's values and gradients (bf16 inputs)."""
    rng = np.random.default_rng(3)
    b, t = 2, 160
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, DH)), jnp.bfloat16) for n in (H, HKV, HKV))
    seg = jnp.asarray(np.repeat(np.arange(4), t // 4)[None].repeat(b, 0), jnp.int32)
    forward, grad = _sequence(None, segments)
    slots = np.broadcast_to(np.arange(t)[None], (b, t))
    segs = np.asarray(seg) if segments else None
    as64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
    want = at.oracle(as64(q), as64(k), as64(v), at.mask(slots, slots, segs, segs), as64(_weights(q.shape)))
    assert at.rel_err(as64(forward(q, k, v, seg)), want["o"]) < 1e-2
    _, grads = grad(q, k, v, seg)
    for name, got in zip(("dq", "dk", "dv"), grads):
        assert at.rel_err(as64(got), want[name]) < 3e-2, name
