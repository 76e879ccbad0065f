"""The contract between a serving engine and what drives it (the HTTP server, benchmarks, evaluation).

An engine accepts requests from any thread (``submit``), runs them on its own thread, and streams their tokens back
through a ``RequestHandle``: a blocking iterator for threads, an async iterator for an asyncio server. A request that
is cancelled (``cancel``, e.g. the client disconnected) frees its slot and ends its stream with finish reason
``cancelled``. Every engine keeps this contract: ``m1jax.serve.static`` (static batches through ``m1jax.generate``, the
baseline) and ``m1jax.serve.engine`` (continuous batching with the paged hybrid cache and prefix caching).
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
import queue
import threading
from typing import AsyncIterator, Iterator

from m1jax.config import Config, ConfigError, setting

FINISH_REASONS = ("stop", "length", "truncated", "cancelled", "error")


@dataclasses.dataclass(frozen=True)
class SamplingParams(Config):
    """Per-request generation settings (the domains are checked on construction)."""
    max_tokens: int = 16
    temperature: float = 1.0                   # 0 = greedy
    top_p: float = 1.0                         # 1 = off
    top_k: int = 0                             # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None                    # None: the engine draws one
    truncate_after: int = 0                    # M1's early truncation: stop after this many confident tokens (0 = off)
    truncate_prob: float = 0.99

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ConfigError(f"stop_token_ids must be >= 0, got {list(self.stop_token_ids)}")
        if self.truncate_after < 0 or not 0 <= self.truncate_prob <= 1:
            raise ConfigError("truncate_after must be >= 0 and truncate_prob in [0, 1]")


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token (``token_id`` None only on a final event with no token, e.g. a cancellation)."""
    request_id: str
    token_id: int | None
    logprob: float | None                      # under the raw model distribution (temperature 1)
    finish_reason: str | None = None           # set on the request's last event: one of FINISH_REASONS
    error: str | None = None                   # with finish_reason "error"


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request."""
    request_id: str
    prompt_tokens: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    cached_prompt_tokens: int = 0              # prompt tokens served from the prefix cache
    time_to_first_token_s: float | None = None


class RequestHandle:
    """The stream of one request's events; filled by the engine thread, read by one consumer."""

    def __init__(self, request_id: str, prompt_tokens: int):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._queue: queue.Queue[TokenEvent] = queue.Queue()
        self._listeners: list = []
        self._lock = threading.Lock()
        self.cached_prompt_tokens = 0
        self.time_to_first_token_s: float | None = None

    # ---- engine side
    def put(self, event: TokenEvent) -> None:
        with self._lock:
            self._queue.put(event)
            for listener in list(self._listeners):
                loop, notify = listener
                try:
                    loop.call_soon_threadsafe(notify)
                except RuntimeError:  # its event loop has closed (a server shut down mid-stream): nobody waits there
                    self._listeners.remove(listener)

    # ---- consumer side
    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._queue.get()
            yield event
            if event.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """The events as an async iterator (for an asyncio server): no thread blocks while waiting."""
        listener = (asyncio.get_running_loop(), (ready := asyncio.Event()).set)
        with self._lock:
            self._listeners.append(listener)
        try:
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    ready.clear()
                    if self._queue.empty():
                        await ready.wait()
                    continue
                yield event
                if event.finish_reason is not None:
                    return
        finally:  # finished, or the consumer stopped reading (a client that went away): no more wake-ups for it
            with self._lock:
                if listener in self._listeners:  # ``put`` drops one whose loop has closed
                    self._listeners.remove(listener)

    def result(self) -> Completion:
        """Block until the request finishes; its tokens and finish reason."""
        tokens, logprobs, reason = [], [], None
        for event in self:
            if event.token_id is not None:
                tokens.append(event.token_id)
                logprobs.append(event.logprob)
            reason = event.finish_reason
        return Completion(self.request_id, self.prompt_tokens, tuple(tokens), tuple(logprobs), reason,
                          self.cached_prompt_tokens, self.time_to_first_token_s)


class Engine(abc.ABC):
    """What every serving engine offers (see the module docstring)."""

    @abc.abstractmethod
    def submit(self, prompt_ids, params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        """Queue a request (thread-safe). Raises ValueError naming the problem for a request the model cannot take
        (token ids outside the vocabulary, prompt + max_tokens past the context) before queueing it."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request (queued or running) and free its slot; its stream ends with ``cancelled``."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the engine's thread (idempotent)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Finish: cancel what is left and join the thread."""

    @abc.abstractmethod
    def stats(self) -> dict:
        """Counters and recent latencies: ``queued``, ``running``, ``generated_tokens``, ``prompt_tokens``,
        ``cached_prompt_tokens``, ``ttft_s`` and ``itl_s`` (lists of recent samples), ``uptime_s``."""
