"""The real (non-interpret) lowerings of the lightning kernels, checked on CPU with ``jax.export``.

Interpret mode does not enforce Triton's power-of-two / no-scratch rules or Mosaic TPU's (8, 128) block tiling; the
export runs the Pallas lowering for the target (spec/jax-notes.md 3.6). Forward and backward (custom VJP), with an
initial state and segment ids, a sequence split, and a length that is not a multiple of the chunk.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.compat import TPU_CALL_TARGET, TRITON_CALL_TARGET
from pallas_kernels.lightning import pallas
from pallas_kernels.lightning.config import KernelConfig

B, T, H, D = 1, 200, 2, 128
# Per walk: the state-only pass and the output pass (groups > 1); forward + dq + dk + dv walks.
EXPECTED_CALLS = 8


def _fwd_and_grad(backend: str, config: KernelConfig):
    def f(q, k, v, s, init, seg):
        def loss(q, k, v, init):
            o, final = pallas.lightning_attention_pallas(q, k, v, s, initial_state=init, segment_ids=seg,
                                                         backend=backend, config=config)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(q, k, v, init)
    return jax.jit(f)


def _args():
    sds = jax.ShapeDtypeStruct
    x = sds((B, T, H, D), jnp.bfloat16)
    return x, x, x, sds((H,), jnp.float32), sds((B, H, D, D), jnp.float32), sds((B, T), jnp.int32)


@pytest.mark.parametrize("backend,config", [("triton", KernelConfig(chunk=64, block_v=64, groups=2)),
                                            ("triton", KernelConfig(chunk=64, block_v=128, groups=1))])
def test_triton_lowering_exports_for_cuda(backend, config):
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        exported = export.export(_fwd_and_grad(backend, config), platforms=("cuda",),
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL_TARGET)])(*_args())
    calls = exported.mlir_module().count(TRITON_CALL_TARGET)
    assert calls == (EXPECTED_CALLS if config.groups > 1 else EXPECTED_CALLS // 2)


def test_tpu_lowering_exports_for_tpu():
    exported = export.export(_fwd_and_grad("tpu", KernelConfig(chunk=128, groups=2)), platforms=("tpu",))(*_args())
    assert exported.mlir_module().count(TPU_CALL_TARGET) == EXPECTED_CALLS


def test_tpu_lowering_rejects_misaligned_blocks():
    """The export catches what interpret mode cannot: segment ids need a chunk that is a multiple of 128 on TPU."""
    with pytest.raises(ValueError, match="divisible by 8 and 128"):
        export.export(_fwd_and_grad("tpu", KernelConfig(chunk=64, groups=1)), platforms=("tpu",))(*_args())
