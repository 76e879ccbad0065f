"""``ModelConfig``: an ``Architecture`` plus its ``Execution`` settings, with the presets and the HF dialects.

``ModelConfig`` is flat (``cfg.hidden_size``, ``cfg.compute_dtype``), and ``cfg.architecture`` / ``cfg.execution``
give the two parts as their own configs: the architecture is what a checkpoint defines and stores, the execution
settings are how this run computes it.

``ModelConfig.m1()`` is the published 456B model; ``ModelConfig.from_hf_config(d)`` reads MiniMax's own
``config.json`` or transformers' ``MiniMaxConfig`` dict (``m1jax.config.hf``); ``param_counts()`` counts parameters.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from m1jax.config.architecture import Architecture, m1_layer_types
from m1jax.config.base import ConfigError
from m1jax.config.execution import Execution
from m1jax.config.hf import architecture_fields_from_hf, architecture_to_hf


@dataclasses.dataclass(frozen=True)
class ModelConfig(Execution, Architecture):
    """Every architectural constant of an M1-style model plus the execution settings (see the two bases)."""

    def validate(self) -> None:
        self._validate_architecture()
        self._validate_execution()

    @property
    def architecture(self) -> Architecture:
        return Architecture(**{n: getattr(self, n) for n in Architecture.field_names()})

    @property
    def execution(self) -> Execution:
        return Execution(**{n: getattr(self, n) for n in Execution.field_names()})

    @classmethod
    def from_parts(cls, architecture: Architecture, execution: Execution | None = None) -> "ModelConfig":
        return cls(**architecture.to_dict(), **(execution or Execution()).to_dict())

    def replace(self, **changes) -> "ModelConfig":
        # A new layer count without a new pattern keeps M1's pattern (period 8, or all layers when fewer).
        if "num_hidden_layers" in changes and "layer_types" not in changes:
            n = changes["num_hidden_layers"]
            if isinstance(n, int) and n > 0:
                changes["layer_types"] = m1_layer_types(n, min(8, n))
        return super().replace(**changes)

    # ------------------------------------------------------------------------------------------------ presets
    @classmethod
    def m1(cls, **overrides) -> "ModelConfig":
        """The published MiniMax-M1 (40k and 80k share it): 456B total, 45.9B active."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A CPU-sized model with the M1 layer pattern (one 8-layer period) for tests and demos."""
        return cls._preset(dict(vocab_size=256, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                                num_experts_per_tok=2, rotary_dim=8, max_position_embeddings=4096, block_size=16,
                                linear_attn_alpha=4.0 ** 0.25, full_attn_alpha=4.0 ** 0.25, mlp_alpha=4.0 ** 0.25),
                           overrides)

    @classmethod
    def m1_100m(cls, **overrides) -> "ModelConfig":
        """About 100M parameters with the M1 pattern (16 layers = 2 periods); used for CPU timing."""
        return cls._preset(dict(vocab_size=32000, hidden_size=512, num_hidden_layers=16, num_attention_heads=8,
                                num_key_value_heads=2, head_dim=64, intermediate_size=256, num_local_experts=8,
                                rotary_dim=32, max_position_embeddings=65536, linear_attn_alpha=32.0 ** 0.25,
                                full_attn_alpha=32.0 ** 0.25, mlp_alpha=32.0 ** 0.25), overrides)

    @classmethod
    def m1_1b(cls, **overrides) -> "ModelConfig":
        """About 1B total parameters with the M1 pattern, for single-GPU benchmarks."""
        return cls._preset(dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                                num_key_value_heads=2, head_dim=64, intermediate_size=1536, num_local_experts=16,
                                rotary_dim=32, max_position_embeddings=1 << 21, linear_attn_alpha=32.0 ** 0.25,
                                full_attn_alpha=32.0 ** 0.25, mlp_alpha=32.0 ** 0.25), overrides)

    @classmethod
    def _preset(cls, base: dict, overrides: dict) -> "ModelConfig":
        fields = {**base, **overrides}
        if "layer_types" not in overrides:
            fields["layer_types"] = m1_layer_types(fields["num_hidden_layers"], min(8, fields["num_hidden_layers"]))
        return cls(**fields)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return getattr(cls, PRESETS[name])(**overrides)

    # ------------------------------------------------------------------------------------------------ HF dialects
    @classmethod
    def from_hf_config(cls, d: Mapping[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
        """Read MiniMax's ``config.json`` dialect or transformers' ``MiniMaxConfig`` dict (or a path to either).

        Unknown keys raise; keys both dialects carry must agree; keys that define the model must be present.
        ``overrides`` set execution fields (compute_dtype, moe_implementation, ...).
        """
        if not isinstance(d, Mapping):
            with open(d) as fh:
                d = json.load(fh)
        return cls(**{**architecture_fields_from_hf(dict(d)), **overrides})

    def to_hf_config(self, dialect: str = "minimax") -> dict[str, Any]:
        """The architecture as MiniMax's ``config.json`` (``dialect="minimax"``) or transformers' dict."""
        return architecture_to_hf(self.architecture, dialect)


# preset name -> ModelConfig constructor name
PRESETS = {"m1": "m1", "m1-456b": "m1", "tiny": "tiny", "m1-100m": "m1_100m", "m1-1b": "m1_1b"}


def apply_overrides(cfg: ModelConfig, overrides) -> ModelConfig:
    """``cfg`` with ``key=value`` strings applied (``--set``), typed by the fields; errors name the key."""
    return cfg.override(overrides)
