"""The one place that imports Pallas (jax 0.11.2).

Kernel modules import ``pl``, ``pltriton``, ``pltpu`` and ``plgpu`` from here, never from ``jax.experimental`` directly,
so that an API move between jax releases is fixed in one file. ``pltriton`` is the Triton backend, ``plgpu`` is Mosaic
GPU (optional: ``None`` where it does not import).

Do not use ``pl.dot``/``pl.load``/``pl.store`` (removed); use ``jnp.dot``/``lax.dot_general`` and ref indexing.
"""
from __future__ import annotations

import warnings

from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

try:  # Mosaic GPU needs jaxlib's mosaic_gpu extension; not every install has it.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the jaxlib build
    plgpu = None

# Custom-call target of Triton-lowered pallas_calls; `jax.export` needs it listed as an allowed custom call.
TRITON_CALL_TARGET: str = getattr(pltriton, "CUSTOM_CALL_TARGET_NAME", "__gpu$xla.gpu.triton")
TPU_CALL_TARGET = "tpu_custom_call"
HAS_GPU_INTERPRET: bool = plgpu is not None and hasattr(plgpu, "InterpretGPUParams")

# jax 0.11 warns on every Triton pallas_call ("The Pallas Triton backend is deprecated"); we use it on purpose
# (it is the GPU backend these kernels are written for), so the warning carries no information for our users.
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

__all__ = ["pl", "pltpu", "pltriton", "plgpu", "TRITON_CALL_TARGET", "TPU_CALL_TARGET", "HAS_GPU_INTERPRET"]
