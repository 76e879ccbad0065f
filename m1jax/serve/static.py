"""The baseline engine: static batches through ``m1jax.generate`` under the same ``Engine`` contract.

It waits until ``max_batch`` requests are queued or the oldest has waited ``batch_timeout_s``, pads the batch to
``max_batch`` rows (so its shapes repeat), runs chunked prefill and the decode loop of ``m1jax.generate`` with
per-row sampling and stop settings, and then streams every row's tokens at once. Every row decodes until the longest
finishes; new requests wait for the whole batch. This is what continuous batching is measured against.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from m1jax import generate as gen
from m1jax.cache import HybridCache
from m1jax.config import Config, ConfigError, setting
from m1jax.serve.loop import FINISH_BY_STOP_REASON, EngineLoop
from m1jax.serve.requests import Request


@dataclasses.dataclass(frozen=True)
class StaticConfig(Config):
    max_batch: int = setting(8, help="rows per batch (padded to it)")
    batch_timeout_s: float = setting(0.05, help="run a partial batch once its oldest request waited this long")
    max_context: int = setting(8192, help="prompt + max_tokens of one request")
    chunk_size: int = setting(512, help="prefill chunk")
    prompt_bucket: int | None = setting(None, help="pad every batch's prompts to this length (<= chunk_size or a "
                                                   "multiple of it; None: generate's bucket of the longest)")
    new_tokens_bucket: int | None = setting(None, help="tokens every batch decodes (None: the power of two >= the "
                                                       "batch's largest max_tokens)")
    kv_dtype: str | None = setting(None, choices=("float32", "bfloat16", "float16"))
    max_stop_tokens: int = setting(8)
    seed: int = setting(0)

    def validate(self) -> None:
        if self.max_batch < 1 or self.chunk_size < 1 or self.max_context < 1:
            raise ConfigError("StaticConfig.max_batch, chunk_size and max_context must be >= 1")
        p = self.prompt_bucket
        if p is not None and (p < 1 or (p > self.chunk_size and p % self.chunk_size)):
            raise ConfigError(f"StaticConfig.prompt_bucket={p} must be <= chunk_size or a multiple of it")


class StaticEngine(EngineLoop):
    """``StaticEngine(model_or_split, config)``; the ``Engine`` contract (cancels take effect between batches)."""

    def __init__(self, model_or_split, config: StaticConfig = StaticConfig()):
        self.split = nnx.split(model_or_split) if isinstance(model_or_split, nnx.Module) else model_or_split
        model_cfg = gen.graphdef_config(*self.split)
        super().__init__(model_cfg, max_context=config.max_context, max_stop_tokens=config.max_stop_tokens,
                         seed=config.seed)
        self.config = config
        self._waiting: collections.deque[Request] = collections.deque()

    def _check_capacity(self, prompt, params) -> None:
        c = self.config
        if c.prompt_bucket is not None and prompt.size > c.prompt_bucket:
            raise ValueError(f"prompt of {prompt.size} tokens exceeds the static engine's prompt_bucket "
                             f"{c.prompt_bucket}")
        if c.new_tokens_bucket is not None and params.max_tokens > c.new_tokens_bucket:
            raise ValueError(f"max_tokens {params.max_tokens} exceeds the static engine's new_tokens_bucket "
                             f"{c.new_tokens_bucket}")

    def _queued(self) -> int:
        return len(self._waiting)

    def _release(self, request: Request) -> None:
        if request in self._waiting:
            self._waiting.remove(request)

    def _idle_timeout(self) -> float | None:
        if not self._waiting:
            return None
        return max(0.0, self._waiting[0].submitted + self.config.batch_timeout_s - time.perf_counter())

    def _step(self, new: list[Request]) -> bool:
        self._waiting.extend(new)
        c = self.config
        if not self._waiting or (len(self._waiting) < c.max_batch and self._idle_timeout() > 0):
            return False
        batch = [self._waiting.popleft() for _ in range(min(c.max_batch, len(self._waiting)))]
        self._run(batch)
        return True

    def _run(self, batch: list[Request]) -> None:
        c = self.config
        graphdef, state = self.split
        prompts = [r.prompt.tolist() for r in batch] + [[0]] * (c.max_batch - len(batch))
        max_tokens = [r.params.max_tokens for r in batch]
        new_tokens = c.new_tokens_bucket or 1 << (max(max_tokens) - 1).bit_length()
        new_tokens = min(new_tokens, c.max_context - max(len(p) for p in prompts))
        params = [r.params for r in batch] + [dataclasses.replace(batch[0].params, temperature=0.0, top_k=0,
                                                                  top_p=1.0, stop_token_ids=(), truncate_after=0)
                                              ] * (c.max_batch - len(batch))
        sampling = gen.Sampling.rows([p.temperature for p in params], [p.top_k for p in params],
                                     [p.top_p for p in params])
        stop = gen.StopRules.rows([p.stop_token_ids for p in params], [p.truncate_after for p in params],
                                  [p.truncate_prob for p in params], slots=c.max_stop_tokens)
        length = c.prompt_bucket or gen.bucket_length(max(len(p) for p in prompts), c.chunk_size)
        tokens, start = gen.left_pad(prompts, length)
        cache = HybridCache.init(self.model_cfg, c.max_batch, length + new_tokens,
                                 kv_dtype=c.kv_dtype or self.model_cfg.compute_dtype, start=start)
        logits, cache = gen.prefill(graphdef, state, tokens, cache, c.chunk_size)
        out = gen.decode(graphdef, state, logits, cache, jax.random.key(batch[0].seed), max_new_tokens=new_tokens,
                         sampling=sampling, stop=stop)
        out_tokens, logprobs = np.asarray(out.tokens), np.asarray(out.model_logprobs)
        lengths, reasons = np.asarray(out.lengths), np.asarray(out.stop_reason)
        self.counters["prompt_tokens"] += sum(r.prompt.size for r in batch)
        self.counters["prefilled_tokens"] += c.max_batch * length
        for row, request in enumerate(batch):
            n = min(int(lengths[row]), request.params.max_tokens)
            finish = FINISH_BY_STOP_REASON[int(reasons[row])] if int(lengths[row]) <= n else "length"
            for i in range(n):
                self._emit(request, int(out_tokens[row, i]), float(logprobs[row, i]),
                           finish if i == n - 1 else None, streamed=False)
