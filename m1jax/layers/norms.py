"""RMSNorm with float32 statistics (every norm in M1), optionally gated (the lightning output)."""
from __future__ import annotations

import jax
from flax import nnx

from m1jax.layers.common import param
from pallas_kernels.norms import rms_norm
from sharding.kernel_parallel import norm_rows_parallel


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps)`` computed in fp32, rounded to ``norm_dtype`` (default x's), times the weight
    (init 1, no offset); with a gate, times ``sigmoid(gate)`` in fp32. ``pallas_kernels.norms.rms_norm`` does the
    math: XLA's form by default, which GSPMD partitions like any other op; the Triton kernels when asked for, which
    under a mesh run per device on their rows (``norm_rows_parallel``).

    ``implementation``: None (per platform) or one of ``pallas_kernels.norms.IMPLEMENTATIONS``.
    """

    def __init__(self, dim: int, eps: float, *, axes=("embed",), param_dtype: str = "float32",
                 implementation: str | None = None, rngs: nnx.Rngs):
        self.eps = eps
        self.feature_axis = axes[-1]
        self.implementation = implementation
        self.weight = param(rngs, (dim,), axes, fill=1.0, dtype_name=param_dtype)

    def __call__(self, x: jax.Array, *, gate: jax.Array | None = None, norm_dtype=None, out_dtype=None
                 ) -> jax.Array:
        """x [..., D] -> [..., D] in out_dtype (default norm_dtype); gate like x or None."""
        def norm(x, weight, gate, implementation=self.implementation):
            return rms_norm(x, weight, eps=self.eps, gate=gate, norm_dtype=norm_dtype, out_dtype=out_dtype,
                            implementation=implementation)
        if self.implementation != "pallas_triton":  # XLA's form (None is XLA on every platform): no shard_map
            return norm(x, self.weight[...], gate)
        return norm_rows_parallel(norm, x, self.weight[...], gate, feature_axis=self.feature_axis)
