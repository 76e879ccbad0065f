"""Paged attention lowers to its kernel for the platform being compiled for: ``jax.export`` on CPU for tpu (Mosaic
custom call) and cuda (Triton custom call), for ``implementation=None`` at M1's decode shapes (64 query heads on
8 KV heads, D = 128, bf16 pages), and the same jitted function executed on CPU gives the XLA reference's values."""
from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from pallas_kernels.attention.paged import paged_attention
from pallas_kernels.attention.paged import reference
from pallas_kernels.compat import TPU_CALL_TARGET, TRITON_CALL_TARGET

B, H, HKV, D, PAGE, PAGES_PER_SEQ, TOTAL = 2, 64, 8, 128, 16, 8, 32


def _args():
    sds = jax.ShapeDtypeStruct
    return (sds((B, H, D), jnp.bfloat16), sds((HKV, TOTAL, PAGE, D), jnp.bfloat16),
            sds((HKV, TOTAL, PAGE, D), jnp.bfloat16), sds((B,), jnp.int32), sds((B, PAGES_PER_SEQ), jnp.int32))


def _custom_calls(target_platform) -> Counter:
    fn = jax.jit(paged_attention)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)]
    if target_platform == "cuda":  # Triton's lowering asks for the GPU model; an abstract one stands in
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
            text = export.export(fn, platforms=("cuda",), disabled_checks=checks)(*_args()).mlir_module()
    else:
        text = export.export(fn, platforms=(target_platform,), disabled_checks=checks)(*_args()).mlir_module()
    return Counter(re.findall(r"custom_call @([\w$.]+)\(", text) + re.findall(r'call_target_name = "([^"]+)"', text))


def test_default_lowers_the_mosaic_kernel_for_tpu():
    calls = _custom_calls("tpu")
    assert calls[TPU_CALL_TARGET] == 1 and calls[TRITON_CALL_TARGET] == 0


def test_default_lowers_the_triton_kernel_for_cuda():
    calls = _custom_calls("cuda")
    assert calls[TRITON_CALL_TARGET] == 1 and calls[TPU_CALL_TARGET] == 0


def test_the_same_jitted_function_runs_the_reference_on_cpu():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, H, D)), jnp.bfloat16)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((HKV, TOTAL, PAGE, D)), jnp.bfloat16) for _ in range(2))
    lengths = jnp.asarray([37, 128], jnp.int32)
    tables = jnp.asarray(rng.permutation(TOTAL)[:B * PAGES_PER_SEQ].reshape(B, PAGES_PER_SEQ), jnp.int32)
    got = jax.jit(paged_attention)(q, k_pages, v_pages, lengths, tables)
    want = reference.paged_attention(q, k_pages, v_pages, lengths, tables)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
