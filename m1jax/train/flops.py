"""Model FLOPs per trained token and datasheet peaks: the two halves of MFU."""
from __future__ import annotations

import jax

from m1jax.config import LIGHTNING, ModelConfig

LIGHTNING_CHUNK = 64  # chunk size C of the lightning FLOP count (the chunked form's work per token)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3 x forward):
    6 x active matmul parameters (projections, router, top-k experts, LM head; the embedding gather is free)
    + lightning layers 3 x 4·H·d·(C + d) (chunked form, C = 64: intra-chunk QKᵀ and PV, inter-chunk state use and
    update)
    + softmax layers 3 x 2·T·H·d (causal QKᵀ and PV averaged over positions: 4·H·d·T/2 forward)."""
    counts = cfg.param_counts()
    matmul = 6.0 * counts["active_with_head"]
    h, d = cfg.num_attention_heads, cfg.head_dim
    n_light = sum(t == LIGHTNING for t in cfg.layer_types)
    n_soft = cfg.num_hidden_layers - n_light
    lightning = 3.0 * n_light * 4 * h * d * (LIGHTNING_CHUNK + d)
    softmax = 3.0 * n_soft * 2 * seq_len * h * d
    return matmul + lightning + softmax


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0,
                    "TPU v6 lite": 918.0}
# Datasheet HBM bandwidth (TB/s): the floor of memory-bound work such as the optimizer update.
PEAK_HBM_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "TPU v5p": 2.76, "TPU v5 lite": 0.82, "TPU v6 lite": 1.64}


def _by_kind(table: dict[str, float], device: jax.Device | None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, value in table.items():
        if name.lower() in kind.lower():
            return value
    return None


def peak_tflops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 datasheet peak of ``device`` (None when unknown, e.g. CPU): the MFU denominator."""
    return _by_kind(PEAK_BF16_TFLOPS, device)


def peak_hbm_tbps(device: jax.Device | None = None) -> float | None:
    """Datasheet memory bandwidth of ``device`` in TB/s (None when unknown)."""
    return _by_kind(PEAK_HBM_TBPS, device)
