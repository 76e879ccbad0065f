"""A model to serve or evaluate, from any of the places weights live, with its tokenizer.

``load_served_model`` takes at most one source, read by ``m1jax.weights.load_weights`` (the stored config says what
the model is): ``hf_checkpoint`` (an HF checkpoint directory) or ``params_dir`` (a converted parameter directory, a
training or RL run directory, or a policy directory); with neither, ``preset`` with random weights from ``seed`` (no
tokenizer: prompts and outputs are token ids).

The tokenizer and chat template are the ``tokenizer.json`` / ``tokenizer_config.json`` of ``tokenizer_dir``,
else of the weights' directory when it has them (``m1jax.serve.text.load_tokenizer``). ``overrides`` are
``key=value`` execution settings (as ``--set``). Everything is placed on the default device.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from m1jax.config import ConfigError, ModelConfig
from m1jax.serve.text import TokenIdText, TokenText, load_tokenizer


@dataclasses.dataclass
class ServedModelSource:
    config: ModelConfig
    model: object          # MiniMaxM1
    text: TokenText
    description: str
    name: str              # the default name to serve it under


def load_served_model(*, preset: str = "tiny", hf_checkpoint: str | None = None, params_dir: str | None = None,
                      overrides: Sequence[str] = (), seed: int = 0, tokenizer_dir: str | None = None
                      ) -> ServedModelSource:
    """The model, its tokenizer and a description (module docstring)."""
    from flax import nnx

    from m1jax.model import init_model
    if hf_checkpoint and params_dir:
        raise ConfigError("give hf_checkpoint or params_dir, not both")
    source = hf_checkpoint or params_dir
    if source:
        from m1jax.weights import checkpoint_kind, load_weights
        kind = checkpoint_kind(source)
        cfg, graphdef, params = load_weights(source, overrides=overrides)
        model = nnx.merge(graphdef, params)
        name = os.path.basename(os.path.normpath(source))
        description = {"hf": "HF checkpoint", "params": "parameter directory", "run": "run directory",
                       "checkpoints": "checkpoint directory"}[kind] + f" {source}"
    else:
        cfg = ModelConfig.preset(preset).override(overrides)
        model = init_model(cfg, seed)
        description, name = f"preset {preset} (random weights, seed {seed})", preset
    if tokenizer_dir:
        text = load_tokenizer(tokenizer_dir)
        if text is None:
            raise ConfigError(f"no tokenizer.json in {tokenizer_dir}")
    else:  # the weights' own directory may hold one
        text = load_tokenizer(source) if source else None
    return ServedModelSource(cfg, model, text or TokenIdText(), description, name)
