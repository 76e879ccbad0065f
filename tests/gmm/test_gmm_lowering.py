"""The grouped-matmul kernels lower for the platform exported for (``jax.export`` on CPU, no GPU or TPU needed): the
Pallas-Triton kernel for cuda, megablox for tpu; ``implementation=None`` picks by that platform, not the host, and
the same jitted function run here (cpu) is ragged_dot."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from pallas_kernels.compat import TPU_CALL_TARGET
from pallas_kernels.compat import TRITON_CALL_TARGET as TRITON_CALL
from pallas_kernels.gmm import grouped_matmul


@pytest.mark.parametrize("rhs_dtype", [jnp.bfloat16, jnp.float32])
def test_forward_and_backward_export_to_cuda(rhs_dtype):
    m, k, n, g = 1000, 256, 384, 8   # M not a multiple of the tile; default (production) tiles
    lhs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((g, k, n), rhs_dtype)
    sizes = jax.ShapeDtypeStruct((g,), jnp.int32)

    def loss(x, w, s):
        out = grouped_matmul(x, w, s, implementation="pallas_triton", preferred_element_type=jnp.float32)
        return jnp.sum(out * out)

    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev)):
        exported = export.export(jax.jit(jax.grad(loss, argnums=(0, 1))), platforms=("cuda",),
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(
            lhs, rhs, sizes)
    text = exported.mlir_module()
    # Three kernels: the forward, d_lhs (transposed rhs) and d_rhs (tgmm), all Triton custom calls.
    assert len(re.findall(re.escape(TRITON_CALL), text)) >= 3
    for name in ("gmm_triton", "gmm_triton_transposed_rhs", "tgmm_triton"):
        assert name in text
    assert [a.shape for a in exported.out_avals] == [(m, k), (g, k, n)]
    assert [a.dtype for a in exported.out_avals] == [jnp.bfloat16, rhs_dtype]
    # fp32 weights: tgmm writes their gradient in fp32; no cast of a bf16 [G, K, N] gradient to fp32 after it.
    assert not re.search(r"stablehlo.convert[^\n]*tensor<8x256x384xbf16>\) -> tensor<8x256x384xf32>", text)


def _default_loss(x, w, s):
    """implementation=None: sum(out * weights), so d/d out is the fixed weights."""
    out = grouped_matmul(x, w, s, preferred_element_type=jnp.float32)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape))


@pytest.mark.parametrize("target_platform,target", [("cuda", TRITON_CALL), ("tpu", TPU_CALL_TARGET)])
def test_default_lowers_the_kernel_of_the_target_platform(target_platform, target):
    """Forward alone, then forward and both gradients (gmm, transposed gmm, tgmm): the kernels of the platform
    exported for, whatever the host."""
    args = (jax.ShapeDtypeStruct((1000, 256), jnp.bfloat16), jax.ShapeDtypeStruct((8, 256, 384), jnp.bfloat16),
            jax.ShapeDtypeStruct((8,), jnp.int32))

    def calls(fn):
        dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=dev)):
            exported = export.export(jax.jit(fn), platforms=(target_platform,),
                                     disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
        return exported.mlir_module().count(target)

    assert calls(_default_loss) >= 1
    assert calls(jax.value_and_grad(_default_loss, argnums=(0, 1))) >= 3


def test_default_jitted_function_is_ragged_dot_on_cpu():
    rng = np.random.default_rng(0)
    sizes = np.asarray([5, 0, 20, 7], np.int32)
    lhs, rhs = rng.standard_normal((40, 16)).astype(np.float32), rng.standard_normal((4, 16, 24)).astype(np.float32)
    value, (d_lhs, d_rhs) = jax.jit(jax.value_and_grad(_default_loss, argnums=(0, 1)))(lhs, rhs, jnp.asarray(sizes))
    group = np.repeat(np.arange(4), sizes)                         # row -> group for the 32 rows in a group
    weights = np.cos(np.arange(40 * 24, dtype=np.float32)).reshape(40, 24).astype(np.float64)
    out = np.zeros((40, 24))
    out[:32] = np.einsum("mk,mkn->mn", lhs[:32].astype(np.float64), rhs[group].astype(np.float64))
    want_lhs = np.zeros((40, 16))
    want_lhs[:32] = np.einsum("mn,mkn->mk", weights[:32], rhs[group].astype(np.float64))
    want_rhs = np.zeros((4, 16, 24))
    np.add.at(want_rhs, group, np.einsum("mk,mn->mkn", lhs[:32].astype(np.float64), weights[:32]))
    np.testing.assert_allclose(float(value), np.sum(out * weights), rtol=1e-4)
    np.testing.assert_allclose(d_lhs, want_lhs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_rhs, want_rhs, rtol=1e-4, atol=1e-4)
