"""The Pallas-Triton grouped matmul lowers for a real GPU (``jax.export`` to cuda on CPU, no GPU needed)."""
import re

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels.compat import TRITON_CALL_TARGET as TRITON_CALL
from pallas_kernels.gmm import grouped_matmul


def test_forward_and_backward_export_to_cuda():
    m, k, n, g = 1000, 256, 384, 8   # M not a multiple of the tile; default (production) tiles
    lhs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((g, k, n), jnp.bfloat16)
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
