"""A model to serve or evaluate, from any of the places weights live, with its tokenizer.

``load_served_model`` takes exactly one source:

* ``hf_checkpoint``: an HF checkpoint directory (config.json + safetensors; ``m1jax.convert.from_hf``).
* ``params_dir``: a directory of weights written by m1jax:
    - a parameter directory (``m1jax.weights.convert_hf``'s output: ``config.json`` + ``params/``),
    - a training run directory (``config.json`` + ``checkpoints/<step>``: the latest step's parameters),
    - a bare orbax parameter directory (``m1jax.checkpoint.load_params``) with the architecture of ``preset``;
  a config.json found there is read with ``m1jax.config.files.load_model_config``.
* neither: ``preset`` with random weights from ``seed`` (no tokenizer: prompts and outputs are token ids).

The tokenizer and chat template are the ``tokenizer.json`` / ``tokenizer_config.json`` of ``tokenizer_dir``,
else of the weights' directory when it has them (``m1jax.serve.text.load_tokenizer``). ``overrides`` are
``key=value`` config settings (as ``--set``). Everything is placed on the default device.
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


def _params_from_run(directory: str, cfg: ModelConfig):
    """The latest checkpoint's parameters of a training run directory."""
    import jax

    from m1jax.checkpoint import Checkpointer, with_shardings
    from m1jax.config.files import read_config
    from m1jax.train.config import TrainConfig
    from m1jax.train.run_dir import checkpoint_dir
    from m1jax.train.state import abstract_train_state
    stored = read_config(directory)
    tc = TrainConfig.from_dict(stored.get("train", {}), base=TrainConfig(), source=f"{directory}/config.json")
    graphdef, abstract = abstract_train_state(cfg, tc)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = with_shardings(abstract, jax.tree_util.tree_map(lambda _: device, abstract))
    checkpointer = Checkpointer(checkpoint_dir(directory), async_save=False)
    try:
        state, _ = checkpointer.restore(abstract)
    finally:
        checkpointer.close()
    return graphdef, state.params


def _load_params(directory: str, cfg: ModelConfig):
    """(graphdef, params) of a parameter directory (leaf checkpoints) onto the default device."""
    import jax
    from flax import nnx

    from m1jax.checkpoint import load_params
    from m1jax.model import abstract_model
    graphdef, params = nnx.split(abstract_model(cfg), nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
    return graphdef, load_params(directory, params)


def load_served_model(*, preset: str = "tiny", hf_checkpoint: str | None = None, params_dir: str | None = None,
                      overrides: Sequence[str] = (), seed: int = 0, tokenizer_dir: str | None = None
                      ) -> ServedModelSource:
    """The model, its tokenizer and a description (module docstring)."""
    from flax import nnx

    from m1jax.config.files import CONFIG_FILE, load_model_config
    from m1jax.model import abstract_model, init_model
    if hf_checkpoint and params_dir:
        raise ConfigError("give hf_checkpoint or params_dir, not both")
    if hf_checkpoint:
        from m1jax.convert import from_hf
        cfg, model = from_hf(hf_checkpoint)
        cfg = cfg.override(overrides)
        model = nnx.merge(nnx.graphdef(abstract_model(cfg)), nnx.state(model))
        source, name = f"HF checkpoint {hf_checkpoint}", os.path.basename(os.path.normpath(hf_checkpoint))
    elif params_dir:
        if not os.path.isdir(params_dir):
            raise ConfigError(f"params_dir {params_dir} is not a directory")
        has_config = os.path.exists(os.path.join(params_dir, CONFIG_FILE))
        cfg = (load_model_config(params_dir) if has_config else ModelConfig.preset(preset)).override(overrides)
        if has_config and os.path.isdir(os.path.join(params_dir, "checkpoints")):
            graphdef, params = _params_from_run(params_dir, cfg)
            kind = "training run"
        else:
            leaves = os.path.join(params_dir, "params")
            graphdef, params = _load_params(leaves if os.path.isdir(leaves) else params_dir, cfg)
            kind = "parameter directory"
        model = nnx.merge(graphdef, params)
        source, name = f"{kind} {params_dir}", os.path.basename(os.path.normpath(params_dir))
    else:
        cfg = ModelConfig.preset(preset).override(overrides)
        model = init_model(cfg, seed)
        source, name = f"preset {preset} (random weights, seed {seed})", preset
    if tokenizer_dir:
        text = load_tokenizer(tokenizer_dir)
        if text is None:
            raise ConfigError(f"no tokenizer.json in {tokenizer_dir}")
    else:  # the weights' own directory may hold one
        text = load_tokenizer(hf_checkpoint or params_dir) if (hf_checkpoint or params_dir) else None
    return ServedModelSource(cfg, model, text or TokenIdText(), source, name)
