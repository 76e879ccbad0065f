"""One hybrid decoder layer: norm -> (lightning | softmax) attention -> norm -> MoE, DeepNorm post-norm residuals."""
from __future__ import annotations

from flax import nnx

from m1jax.config import LIGHTNING, ModelConfig
from m1jax.layers.attention import SoftmaxAttention
from m1jax.layers.lightning import LightningAttention
from m1jax.layers.moe import MoE
from m1jax.layers.norms import RMSNorm


class DecoderLayer(nnx.Module):
    """x [B, T, D] -> x [B, T, D] (docs/model.md §2)::

        h = norm_in(x);   x = alpha_attn * (h if postnorm else x) + beta_attn * attn(h)
        h = norm_post(x); x = alpha_mlp  * (h if postnorm else x) + beta_mlp  * moe(h)
    """

    def __init__(self, cfg: ModelConfig, layer_type: str, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer_type = layer_type
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype,
                                       implementation=cfg.norm_implementation, rngs=rngs)
        if layer_type == LIGHTNING:
            self.self_attn = LightningAttention(cfg, rngs=rngs)
            self.alpha, self.beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
        else:
            self.self_attn = SoftmaxAttention(cfg, rngs=rngs)
            self.alpha, self.beta = cfg.full_attn_alpha, cfg.full_attn_beta
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=cfg.param_dtype,
                                                implementation=cfg.norm_implementation, rngs=rngs)
        self.block_sparse_moe = MoE(cfg, rngs=rngs)

    def __call__(self, x, *, layer_index, positions, segment_ids=None, cache=None, cache_index=None,
                 cache_start=None, valid=None):
        """Returns (x, router_logits [B*T, E], experts [B*T, k], new cache entry or None).

        ``cache`` is this layer's entry: the fp32 state [B, H, Dk, Dv] (lightning) or (k, v) (softmax) of a
        ``HybridCache``, or the layer's view of a ``PagedCache`` (``LightningSlots`` / ``PagedKV``), which the
        attention modules dispatch on.
        """
        h = self.input_layernorm(x)
        if self.layer_type == LIGHTNING:
            attn, new_cache = self.self_attn(h, layer_index, segment_ids=segment_ids, state=cache, valid=valid)
        else:
            attn, new_cache = self.self_attn(h, positions, segment_ids=segment_ids, kv_cache=cache,
                                             cache_index=cache_index, cache_start=cache_start)
        x = self.alpha * (h if self.cfg.postnorm else x) + self.beta * attn
        h = self.post_attention_layernorm(x)
        y, router_logits, experts = self.block_sparse_moe(h)
        x = self.cfg.mlp_alpha * (h if self.cfg.postnorm else x) + self.cfg.mlp_beta * y
        return x, router_logits, experts, new_cache
