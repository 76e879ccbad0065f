"""Configuration of m1jax: typed frozen dataclasses (``base``), the model's architecture and execution settings,
presets and HF dialects (``model``), and the one ``config.json`` format of run directories (``files``)."""
from m1jax.config.architecture import LAYER_TYPES, LIGHTNING, SOFTMAX, Architecture, m1_layer_types
from m1jax.config.base import Config, ConfigError, apply_section_overrides, setting
from m1jax.config.execution import (ATTENTION_IMPLEMENTATIONS, DTYPES, GMM_IMPLEMENTATIONS, LIGHTNING_IMPLEMENTATIONS,
                                    LM_HEAD_PRECISIONS, MOE_IMPLEMENTATIONS, MOE_TRANSPORTS, NORM_IMPLEMENTATIONS,
                                    REMAT_GRANULARITIES, Execution)
from m1jax.config.model import PRESETS, ModelConfig, apply_overrides

__all__ = ["ATTENTION_IMPLEMENTATIONS", "Architecture", "Config", "ConfigError", "DTYPES", "Execution",
           "GMM_IMPLEMENTATIONS", "LAYER_TYPES", "LIGHTNING", "LIGHTNING_IMPLEMENTATIONS", "LM_HEAD_PRECISIONS",
           "MOE_IMPLEMENTATIONS", "MOE_TRANSPORTS", "ModelConfig", "NORM_IMPLEMENTATIONS", "PRESETS",
           "REMAT_GRANULARITIES", "SOFTMAX", "apply_overrides", "apply_section_overrides", "m1_layer_types", "setting"]
