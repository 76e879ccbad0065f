"""Pick and configure an engine by name (the entry points' ``--engine`` and ``--engine_set``).

``build_engine("continuous" | "static", model, settings)``: ``settings`` are ``key=value`` overrides of the engine's
config (``m1jax.serve.config.EngineConfig`` or ``m1jax.serve.static.StaticEngineConfig``), checked by name and type
before anything compiles. The continuous engine's context length defaults to the smaller of its config's default and
the model's ``max_position_embeddings``, so a small preset serves without settings.
"""
from __future__ import annotations

from typing import Sequence

from m1jax.config import ConfigError
from m1jax.serve.types import Engine

ENGINES = ("continuous", "static")
DEFAULT_ENGINE = "continuous"


def engine_config(name: str, max_positions: int, settings: Sequence[str] = ()):
    """The config of engine ``name`` with ``settings`` applied (ConfigError names a bad one)."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose from {list(ENGINES)}")
    if name == "static":
        from m1jax.serve.static import StaticEngineConfig
        return StaticEngineConfig().override(list(settings))
    from m1jax.serve.config import EngineConfig
    config = EngineConfig().override(list(settings))
    if not any(s.split("=", 1)[0].strip() == "max_context" for s in settings):
        config = config.replace(max_context=min(config.max_context, max_positions))
    if config.max_context > max_positions:
        raise ConfigError(f"engine setting max_context={config.max_context} exceeds the model's "
                          f"max_position_embeddings={max_positions}")
    return config


def build_engine(name: str, model, settings: Sequence[str] = ()) -> Engine:
    """Engine ``name`` over ``model`` (an ``nnx`` model or its ``nnx.split``); not started."""
    from flax import nnx

    from m1jax.generate import graphdef_config
    split = nnx.split(model) if isinstance(model, nnx.Module) else model
    config = engine_config(name, graphdef_config(*split).max_position_embeddings, settings)
    if name == "static":
        from m1jax.serve.static import StaticEngine
        return StaticEngine(split, config)
    from m1jax.serve.engine import ContinuousEngine
    return ContinuousEngine(split, config)
