"""Settings of the continuous-batching engine (``m1jax.serve.engine``); docs/serving.md explains each choice."""
from __future__ import annotations

import dataclasses

from m1jax.config import Config, ConfigError, setting


@dataclasses.dataclass(frozen=True)
class EngineConfig(Config):
    """Capacity, chunking, buckets and the prefix cache of a ``ContinuousEngine``."""
    max_batch: int = setting(64, help="sequence slots: requests running at once (decode rows)")
    max_context: int = setting(8192, help="prompt + max_tokens of one request, in tokens")
    page_size: int = setting(128, help="tokens per KV page")
    num_pages: int | None = setting(None, help="KV pages per softmax layer (None: every slot at max_context, +1 "
                                               "scratch page)")
    chunk_size: int = setting(512, help="longest prefill chunk (tokens)")
    token_budget: int = setting(1024, help="tokens computed per engine step: decode rows + prefill chunks")
    snapshot_interval: int = setting(2048, help="prefix cache granularity N: a lightning-state snapshot every N "
                                                "prompt tokens (prefill chunks end on multiples of N)")
    prefix_cache_bytes: int = setting(1 << 30, help="prefix cache budget: snapshots + pages it holds (0 = off)")
    min_decode_rows: int = setting(1, help="smallest decode row bucket (buckets: powers of two up to max_batch)")
    min_chunk: int = setting(16, help="smallest prefill chunk bucket (powers of two up to chunk_size)")
    min_context_bucket: int = setting(1024, help="smallest context bucket in tokens: the page-table width of a call "
                                                 "is a power of two of pages, at least this, at most max_context")
    kv_dtype: str | None = setting(None, choices=("float32", "bfloat16", "float16"),
                                   help="KV page dtype (None: the model's compute dtype)")
    max_stop_tokens: int = setting(8, help="stop tokens per request (a fixed count keeps shapes static)")
    seed: int = setting(0, help="draws the seeds of requests that give none")
    overlap: bool = setting(True, help="dispatch decode step N + 1 before reading step N back (its tokens are fed "
                                       "on the device); a stop is then seen one step late")

    def validate(self) -> None:
        for name in ("max_batch", "max_context", "page_size", "chunk_size", "token_budget", "snapshot_interval",
                     "min_decode_rows", "min_chunk", "min_context_bucket", "max_stop_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_bytes < 0:
            raise ConfigError(f"EngineConfig.prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.token_budget < self.max_batch + self.chunk_size:
            raise ConfigError(f"EngineConfig.token_budget={self.token_budget} must be >= max_batch + chunk_size = "
                              f"{self.max_batch + self.chunk_size}, so every step can decode all rows and prefill "
                              f"one chunk")
        if self.num_pages is not None and self.num_pages < 2:
            raise ConfigError(f"EngineConfig.num_pages must be >= 2 (page 0 is scratch), got {self.num_pages}")

    @property
    def pages_per_sequence(self) -> int:
        return -(-self.max_context // self.page_size)

    @property
    def total_pages(self) -> int:
        """Pages per softmax layer, the scratch page included."""
        return self.num_pages if self.num_pages is not None else self.max_batch * self.pages_per_sequence + 1
