"""Serving: engines that turn requests into streamed tokens (docs/serving.md).

``types`` is the contract every engine keeps; ``engine.ContinuousEngine`` (continuous batching, the paged hybrid
cache, the prefix cache; settings in ``config.EngineConfig``) and ``static.StaticEngine`` (static batches through
``m1jax.generate``, the baseline; settings in ``static.StaticEngineConfig``) implement it.
"""
