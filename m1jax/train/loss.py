"""The pretraining / SFT objective: masked next-token cross-entropy through the fused (optionally fp32) LM head,
plus the MoE load-balancing loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m1jax.losses import linear_cross_entropy
from m1jax.model import MiniMaxM1
from m1jax.train.config import TrainConfig


def head_kernel(model: MiniMaxM1) -> jax.Array:
    """[D, V] output projection (the transposed embedding when tied)."""
    return model.embed_tokens.embedding[...].T if model.lm_head is None else model.lm_head.kernel[...]


def lm_loss(params, graphdef, batch: dict, tc: TrainConfig, n_tokens: jax.Array):
    """Summed masked next-token NLL / ``n_tokens`` + coef * aux loss, for one (micro-)batch of ``[B, T]`` arrays.

    Returns (loss, (nll_sum, aux_loss)); ``n_tokens`` is the whole step's mask count, so micro-batch losses add up to
    the batch mean.
    """
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    out = model.backbone(batch["inputs"], batch["positions"], batch.get("segment_ids"))
    hidden = out.hidden.astype(jnp.dtype(cfg.compute_dtype))
    nll = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head_kernel(model),
                               batch["targets"].reshape(-1), chunk_size=tc.ce_chunk_size, fp32=cfg.lm_head_fp32,
                               fp32_precision=cfg.lm_head_precision, implementation=tc.ce_implementation)
    nll_sum = jnp.sum(nll * batch["loss_mask"].reshape(-1).astype(jnp.float32))
    loss = nll_sum / n_tokens + cfg.router_aux_loss_coef * out.aux_loss / tc.grad_accum
    return loss, (nll_sum, out.aux_loss)
