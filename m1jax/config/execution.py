"""How a model is computed: dtypes, kernel implementations, rematerialisation, expert-parallel transport.

None of these change what a checkpoint holds (``param_dtype`` aside, which sets the stored master dtype), so a run
may resume with different execution settings; ``Architecture`` fields must match. The choices below are the names
the kernel APIs accept (``pallas_kernels.<op>.api.IMPLEMENTATIONS``; a test keeps the two lists equal), kept here as
data so that reading a config imports no JAX.
"""
from __future__ import annotations

import dataclasses

from m1jax.config.base import Config, setting

DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLEMENTATIONS = ("sorted", "dense", "expert_parallel")
# How expert_parallel moves tokens between shards (sharding/expert_parallel.py); None picks the default (padded).
MOE_TRANSPORTS = ("padded", "ragged")
# How the fp32 LM head multiplies (lm_head_fp32=True): "float32" = fp32 operands at HIGHEST precision (exact fp32);
# "bf16_3x" = the same fp32 operands through three bf16 tensor-core passes (XLA's BF16_BF16_F32_X3 algorithm: ~1e-6
# relative error, several times faster than fp32 SIMT matmuls on an H100; XLA:CPU runs it as fp32, and XLA:GPU as
# three GEMMs with split/convert passes); "bf16_3x_fused" = the same three bf16 products, written out: each fp32
# operand split into bf16 hi + lo and the products run as ONE bf16 GEMM over a 3x contraction (2x when an operand is
# bf16 already, as the training hidden states are), forward and backward (m1jax/layers/embed.py HeadMatmul).
LM_HEAD_PRECISIONS = ("float32", "bf16_3x", "bf16_3x_fused")
# What jax.checkpoint wraps when remat=True (m1jax/model.py): the scanned period, each decoder layer, or both.
REMAT_GRANULARITIES = ("period", "layer", "nested")
LIGHTNING_IMPLEMENTATIONS = ("xla_chunked", "recurrent", "pallas_triton", "pallas_mosaic_gpu", "pallas_tpu")
GMM_IMPLEMENTATIONS = ("pallas_triton", "tokamax", "megablox", "ragged_dot")
ATTENTION_IMPLEMENTATIONS = ("xla", "xla_blockwise", "cudnn", "pallas_triton", "pallas_tpu")
NORM_IMPLEMENTATIONS = ("pallas_triton", "xla")


@dataclasses.dataclass(frozen=True)
class Execution(Config):
    """Numerics and kernels of a model's computation (None = the best for the platform being compiled for)."""
    compute_dtype: str = setting("float32", choices=DTYPES, resume=False,
                                 help="matmul operand and result dtype (fp32 accumulation); bfloat16 on GPU/TPU")
    param_dtype: str = setting("float32", choices=DTYPES, help="dtype of the stored parameters (fp32 masters)")
    lm_head_fp32: bool = setting(True, resume=False, help="LM head with fp32 operands (M1's RL fix)")
    lm_head_precision: str = setting("float32", choices=LM_HEAD_PRECISIONS, resume=False,
                                     help="how the fp32 head multiplies (only read when lm_head_fp32)")
    moe_implementation: str = setting("sorted", choices=MOE_IMPLEMENTATIONS, resume=False)
    # expert_parallel only: None = dropless (a worst-case all-to-all buffer, EP x the mean load); c > 0 keeps
    # ceil(c * tokens * k / EP) rows per destination shard and drops the overflow (sharding/expert_parallel.py).
    moe_capacity_factor: float | None = setting(None, resume=False)
    moe_transport: str | None = setting(None, choices=MOE_TRANSPORTS, resume=False)
    lightning_implementation: str | None = setting(None, choices=LIGHTNING_IMPLEMENTATIONS, resume=False)
    gmm_implementation: str | None = setting(None, choices=GMM_IMPLEMENTATIONS, resume=False)
    attention_implementation: str | None = setting(None, choices=ATTENTION_IMPLEMENTATIONS, resume=False)
    norm_implementation: str | None = setting(None, choices=NORM_IMPLEMENTATIONS, resume=False)
    scan_layers: bool = setting(True, resume=False, help="compile the layer periods as one lax.scan body")
    remat: bool = setting(False, resume=False)
    # With remat: "period" (jax.checkpoint around each scanned period), "layer" (around each decoder layer) or
    # "nested" (both); see m1jax/model.py.
    remat_granularity: str = setting("period", choices=REMAT_GRANULARITIES, resume=False)

    def validate(self) -> None:
        Execution._validate_execution(self)

    def _validate_execution(self) -> None:
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            from m1jax.config.base import ConfigError
            raise ConfigError(f"{type(self).__name__}.moe_capacity_factor: must be None (dropless) or > 0, got "
                              f"{self.moe_capacity_factor!r}")
