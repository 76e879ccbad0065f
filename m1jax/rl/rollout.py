"""RL rollout: G samples per prompt as one jitted computation (prefill + the ``lax.while_loop`` decode).

``sample(graphdef, params, prompt_tokens, start, key, rcfg, ...)`` runs ``m1jax.generate``'s decode loop (cache
allocated inside the program, so nothing is donated across calls) and records the sampler's fp32 log-probs of the
raw model distribution (the M1 FP32 head when ``cfg.lm_head_fp32``). Under ``jax.set_mesh`` with params placed by
``sharding.rules.state_shardings`` and the rows given as global arrays sharded over the batch axes, the rollout runs
on every device of every process at once; with the partitionable threefry RNG (JAX's default) the samples depend on
the key and the rows only, not on the device or process layout.

Layout: prompts are left-padded to a fixed length P (``m1jax.rl.task.encode_prompts``), so a row is
``tokens [P + N] = prompt (left-padded) ++ response (right-padded with pad_id)`` with N = max_new_tokens; ``start``
is the first valid slot of the row (the slots before it are padding, excluded by the cache's ``start`` in the sampler
and by segment ids in the trainer forward). The G responses of one prompt are adjacent rows.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax import generate
from m1jax.cache import HybridCache
from m1jax.config import Config, ConfigError, setting
from sharding.rules import constrain

# Python-side trace counts of the jitted rollout (incremented only while tracing): the no-recompilation test reads it.
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class RolloutConfig(Config):
    """Sampling settings of one RL rollout.

    max_new_tokens: N (None: the task's). truncate_after / truncate_prob: M1's early truncation (stop a row after that
    many consecutive sampled tokens each of probability > truncate_prob; M1 used 3000 and 0.99; <= 0 disables it).
    chunk_size: prompt tokens per prefill forward. kv_dtype: the softmax layers' KV cache (None: compute dtype).
    """
    group_size: int = setting(16, help="samples per prompt (G)")
    max_new_tokens: int | None = setting(None, help="response length limit N (None: the task's)")
    temperature: float = setting(1.0, help="sampling temperature of the RL rollouts")
    truncate_after: int = setting(3000, help="M1 repetition truncation run length (<= 0: off)")
    truncate_prob: float = setting(0.99, help="M1 repetition truncation probability threshold")
    chunk_size: int = setting(512, resume=False, help="prompt tokens per prefill forward")
    kv_dtype: str | None = setting(None, resume=False, help="KV cache dtype (None: the compute dtype)")

    def validate(self) -> None:
        if self.group_size < 1 or self.chunk_size < 1:
            raise ConfigError(f"RolloutConfig: group_size and chunk_size must be >= 1, got {self.group_size}, "
                             f"{self.chunk_size}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollout:
    """A rollout of R rows (device arrays; global arrays sharded over rows on a mesh).

    prompt_tokens [R, P] int32 left-padded; start [R] int32; responses [R, N] int32 (pad_id after each response's
    end); sampler_logp [R, N] float32 log-prob of each response token under the raw model (0 past the end);
    max_probs [R, N] float32; lengths [R] int32 (the stop token counted); stop_reason [R] int32
    (generate.MAX_LENGTH / STOP_TOKEN / TRUNCATED).
    """
    prompt_tokens: jax.Array
    start: jax.Array
    responses: jax.Array
    sampler_logp: jax.Array
    max_probs: jax.Array
    lengths: jax.Array
    stop_reason: jax.Array

    @property
    def tokens(self) -> jax.Array:
        """[R, P + N] prompt ++ response."""
        return jnp.concatenate([self.prompt_tokens, self.responses], axis=1)

    @property
    def response_mask(self) -> jax.Array:
        """[R, N] float32: 1 on generated tokens (the stop token included), 0 after."""
        n = self.responses.shape[1]
        return (jnp.arange(n)[None, :] < self.lengths[:, None]).astype(jnp.float32)


def _sample(graphdef, params, prompt_tokens, start, key, sampling, stop, *, max_new_tokens: int, pad_id: int,
            chunk_size: int, kv_dtype: str | None) -> Rollout:
    TRACE_COUNTS["sample"] += 1
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    rows, p = prompt_tokens.shape
    cache = HybridCache.init(cfg, rows, p + max_new_tokens, kv_dtype=kv_dtype or cfg.compute_dtype, start=start)
    cache = _constrain_cache(cache)
    for s in range(0, p, chunk_size):  # static: a few chunks at most
        out = model.backbone(prompt_tokens[:, s:s + chunk_size], cache=cache)
        cache = out.cache
    logits = model.logits(out.hidden[:, -1])
    decoded = generate.decode(graphdef, params, logits, cache, key, max_new_tokens=max_new_tokens,
                              sampling=sampling, stop=stop, pad_id=pad_id)
    rows_2d, rows_1d = ("batch", None), ("batch",)
    # The sampler's log-probs: of the raw model (temperature 1), the policy being trained, whatever the temperature.
    return Rollout(prompt_tokens=prompt_tokens, start=start,
                   responses=constrain(decoded.tokens, rows_2d),
                   sampler_logp=constrain(decoded.model_logprobs.astype(jnp.float32), rows_2d),
                   max_probs=constrain(decoded.max_probs.astype(jnp.float32), rows_2d),
                   lengths=constrain(decoded.lengths, rows_1d), stop_reason=constrain(decoded.stop_reason, rows_1d))


_sample_jit = jax.jit(_sample, static_argnums=0,
                      static_argnames=("max_new_tokens", "pad_id", "chunk_size", "kv_dtype"))


def _constrain_cache(cache: HybridCache) -> HybridCache:
    """Pin the cache's batch axis to the mesh's batch axes (its zeros are created inside the program)."""
    def one(entry):
        if "state" in entry:  # [R, B, H, Dk, Dv]
            return {"state": constrain(entry["state"], (None, "batch", "heads", None, None))}
        return {k: constrain(v, (None, "batch", None, "kv", None)) for k, v in entry.items()}  # [R, B, S, Hkv, D]
    return dataclasses.replace(cache, layers=tuple(one(e) for e in cache.layers),
                               start=constrain(cache.start, ("batch",)))


def sample(graphdef, params, prompt_tokens, start, key, rcfg: RolloutConfig, *, pad_id: int,
           stop_ids: Sequence[int], max_new_tokens: int | None = None, temperature: float | None = None) -> Rollout:
    """Sample one response for each of R left-padded prompt rows (repeat a prompt G times for a group).

    Args:
      graphdef, params: the split model (params are traced, so new params never recompile).
      prompt_tokens: [R, P] int32 left-padded prompts; start: [R] int32 first valid slot (P - prompt length).
      key: a jax PRNG key; rcfg: sampling settings; pad_id, stop_ids: the task's tokens.
      max_new_tokens: N, if rcfg.max_new_tokens is None. temperature: overrides rcfg.temperature (0: greedy); it is
        traced, so greedy and sampled evaluation share one program.
    """
    n_new = rcfg.max_new_tokens if rcfg.max_new_tokens is not None else max_new_tokens
    if n_new is None or n_new < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (from the RolloutConfig or the task), got {n_new}")
    sampling = generate.Sampling.make(temperature=rcfg.temperature if temperature is None else temperature)
    stop = generate.StopRules.make(tuple(stop_ids), rcfg.truncate_after, rcfg.truncate_prob)
    return _sample_jit(graphdef, params, prompt_tokens, start, key, sampling, stop, max_new_tokens=int(n_new),
                       pad_id=int(pad_id), chunk_size=rcfg.chunk_size, kv_dtype=rcfg.kv_dtype)


def repeat_rows(prompt_tokens: np.ndarray, start: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, P], [n] -> [n * G, P], [n * G]: each prompt repeated for its group of G adjacent rows."""
    return np.repeat(np.asarray(prompt_tokens, np.int32), group_size, axis=0), np.repeat(
        np.asarray(start, np.int32), group_size)
