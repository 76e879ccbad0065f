"""The hybrid decoding cache: fp32 lightning states for lightning layers, a preallocated KV cache for softmax layers.

Layout follows the model's scan over layer periods: ``layers[pos]`` is the entry of position ``pos`` inside the
period, stacked over the R repeats of the period:
* lightning position: ``{"state": [R, B, H, Dk, Dv] float32}`` (size independent of the sequence length);
* softmax position:  ``{"k": [R, B, S, Hkv, Dh], "v": [R, B, S, Hkv, Dh]}`` in ``kv_dtype``.
``index`` (int32 scalar) is the next slot to write; ``start`` [B] is each row's first valid slot, so a batch of
prompts of different lengths is left-padded (padded slots are masked for softmax layers and contribute nothing to
lightning states).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m1jax.config import LIGHTNING, ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridCache:
    layers: tuple
    index: jax.Array
    start: jax.Array

    @property
    def max_length(self) -> int:
        for entry in self.layers:
            if "k" in entry:
                return entry["k"].shape[2]
        return -1  # no softmax layers: no length limit

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_length: int, *, kv_dtype: str = "bfloat16",
             start: jax.Array | None = None) -> "HybridCache":
        period = cfg.layer_period
        repeats = cfg.num_hidden_layers // period
        layers = []
        for layer_type in cfg.layer_types[:period]:
            if layer_type == LIGHTNING:
                shape = (repeats, batch, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim)
                layers.append({"state": jnp.zeros(shape, jnp.float32)})
            else:
                shape = (repeats, batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
                layers.append({"k": jnp.zeros(shape, kv_dtype), "v": jnp.zeros(shape, kv_dtype)})
        start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        if start.shape != (batch,):
            raise ValueError(f"start must be [batch]=({batch},), got {start.shape}")
        return cls(layers=tuple(layers), index=jnp.zeros((), jnp.int32), start=start)

    def lightning_bytes(self) -> int:
        return sum(e["state"].nbytes for e in self.layers if "state" in e)

    def kv_bytes(self) -> int:
        return sum(e["k"].nbytes + e["v"].nbytes for e in self.layers if "k" in e)
