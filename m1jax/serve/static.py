"""The static-batching engine: queued requests run in batches through ``m1jax.generate`` (the baseline engine).

The engine thread waits for a request, then collects more for at most ``batch_timeout_s`` or until
``max_batch_size`` are queued, and runs one batch of requests that share their sampling settings (the oldest
request's settings pick the batch; requests with other settings wait for a later batch, in arrival order). A sampled
request with its own ``seed`` runs alone, so the same seed gives the same tokens whatever else is queued. Each batch
is one ``m1jax.generate`` call: prompts left-padded to their bucket, ``max_new_tokens`` the largest request's
``max_tokens`` rounded up to a power of two (so few programs are compiled); each request keeps its first
``max_tokens`` tokens. With ``pad_batch`` the batch is padded to ``max_batch_size`` rows, so one program serves every
batch size. A request's tokens are streamed when its batch finishes (a static batch has no earlier tokens to give).

Cancellation: a queued request is dropped; a running one ends its stream at once with ``cancelled`` and the tokens
its batch still computes for it are discarded.

Statistics (``stats``): ``ttft_s`` is the time from submission to the batch's end (when the first token reaches the
client); ``itl_s`` is the batch's time (prefill included) divided by its decode steps, one sample per request.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
import time
import uuid

import numpy as np

from m1jax.config import Config, ConfigError, setting
from m1jax.serve.types import Engine, RequestHandle, SamplingParams, TokenEvent

STOP_SLOTS = 8  # stop token ids per request (a fixed count keeps the compiled programs' shapes static)


@dataclasses.dataclass(frozen=True)
class StaticEngineConfig(Config):
    """Settings of the static-batching engine (see the module docstring)."""
    max_batch_size: int = setting(8, help="requests per batch")
    batch_timeout_s: float = setting(0.01, help="how long to wait for more requests once one is queued")
    chunk_size: int = setting(512, help="prefill chunk size (m1jax.generate)")
    kv_dtype: str | None = setting(None, choices=("float32", "bfloat16", "float16"),
                                   help="KV cache dtype (None: the model's compute dtype)")
    pad_batch: bool = setting(True, help="pad every batch to max_batch_size rows (one compiled program)")
    min_new_tokens_bucket: int = setting(16, help="smallest decode length compiled")
    seed: int = setting(0, help="seed of the sampling keys of requests without their own seed")
    stats_window: int = setting(1000, help="recent latency samples kept for stats()")

    def validate(self) -> None:
        if self.max_batch_size < 1 or self.chunk_size < 1 or self.min_new_tokens_bucket < 1:
            raise ConfigError("max_batch_size, chunk_size and min_new_tokens_bucket must be >= 1")
        if self.batch_timeout_s < 0 or self.stats_window < 1:
            raise ConfigError("batch_timeout_s must be >= 0 and stats_window >= 1")


@dataclasses.dataclass(eq=False)
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    handle: RequestHandle
    submitted: float
    finished: bool = False  # the final event was put (guarded by the engine's lock)

    def batch_key(self) -> tuple:
        p = self.params
        seeded = p.temperature > 0 and p.seed is not None
        return (p.temperature, p.top_k, p.top_p, p.stop_token_ids, p.truncate_after, p.truncate_prob,
                ("alone", self.request_id) if seeded else None)


def _finish_reason(length: int, stop_reason: int, max_tokens: int) -> tuple[int, str]:
    """(tokens kept, finish reason) of a row of ``m1jax.generate`` cut at the request's ``max_tokens``."""
    from m1jax import generate as gen
    if length <= max_tokens and stop_reason == gen.STOP_TOKEN:
        return length, "stop"
    if length <= max_tokens and stop_reason == gen.TRUNCATED:
        return length, "truncated"
    return min(length, max_tokens), "length"


class StaticEngine(Engine):
    """Static batches through ``m1jax.generate``; ``model_or_split`` is a model or its ``nnx.split``."""

    def __init__(self, model_or_split, config: StaticEngineConfig | None = None):
        from flax import nnx

        from m1jax.generate import graphdef_config
        self.config = config or StaticEngineConfig()
        self.split = (nnx.split(model_or_split) if isinstance(model_or_split, nnx.Module) else model_or_split)
        self.model_config = graphdef_config(*self.split)
        self._lock = threading.Condition()
        self._queue: list[_Request] = []
        self._running: dict[str, _Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._rng = np.random.default_rng(self.config.seed)
        self._counts = collections.Counter()
        self._ttft = collections.deque(maxlen=self.config.stats_window)
        self._itl = collections.deque(maxlen=self.config.stats_window)
        self._started = time.monotonic()

    # ------------------------------------------------------------------------------------------------ contract
    def submit(self, prompt_ids, params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        from m1jax.generate import check_request
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        prompt = np.asarray(prompt_ids)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError("the prompt must be a non-empty sequence of integer token ids")
        prompt = prompt.tolist()
        check_request(self.model_config, [prompt], params.max_tokens)
        if len(params.stop_token_ids) > STOP_SLOTS:
            raise ValueError(f"at most {STOP_SLOTS} stop token ids, got {len(params.stop_token_ids)}")
        bad = [t for t in params.stop_token_ids if t >= self.model_config.vocab_size]
        if bad:
            raise ValueError(f"stop token ids {bad} are not in the vocabulary (vocab_size="
                             f"{self.model_config.vocab_size})")
        request_id = request_id or uuid.uuid4().hex
        handle = RequestHandle(request_id, len(prompt))
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if request_id in self._running or any(r.request_id == request_id for r in self._queue):
                raise ValueError(f"request id {request_id!r} is already in use")
            self._queue.append(_Request(request_id, prompt, params, handle, time.monotonic()))
            self._counts["submitted"] += 1
            self._lock.notify_all()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._lock:
            for i, request in enumerate(self._queue):
                if request.request_id == request_id:
                    del self._queue[i]
                    self._finish(request, "cancelled")
                    return
            request = self._running.get(request_id)
            if request is not None and not request.finished:
                self._finish(request, "cancelled")

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="m1jax-static-engine", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            for request in self._queue:
                self._finish(request, "cancelled")
            self._queue.clear()
            for request in self._running.values():
                if not request.finished:
                    self._finish(request, "cancelled")
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def stats(self) -> dict:
        with self._lock:
            return {"queued": len(self._queue), "running": len(self._running),
                    "generated_tokens": self._counts["generated_tokens"],
                    "prompt_tokens": self._counts["prompt_tokens"], "cached_prompt_tokens": 0,
                    "submitted_requests": self._counts["submitted"], "finished_requests": self._counts["finished"],
                    "cancelled_requests": self._counts["cancelled"],
                    "ttft_s": list(self._ttft), "itl_s": list(self._itl),
                    "uptime_s": time.monotonic() - self._started}

    # ------------------------------------------------------------------------------------------------ engine thread
    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        """Put the final event with no token (caller holds the lock)."""
        request.finished = True
        self._counts["cancelled" if reason == "cancelled" else "finished"] += 1
        request.handle.put(TokenEvent(request.request_id, None, None, finish_reason=reason, error=error))

    def _next_batch(self) -> list[_Request] | None:
        """Wait for requests; the batch to run (None once stopping)."""
        cfg = self.config
        with self._lock:
            while not self._queue and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            deadline = self._queue[0].submitted + cfg.batch_timeout_s
            while len(self._queue) < cfg.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._queue:
                    break
                self._lock.wait(remaining)
            if self._stopping or not self._queue:
                return None if self._stopping else []
            key = self._queue[0].batch_key()
            batch, longest, wanted = [], 0, 0
            for r in self._queue:  # rows share one decode length: every row's prompt plus it must fit the model
                fits = (max(longest, len(r.prompt)) + max(wanted, r.params.max_tokens)
                        <= self.model_config.max_position_embeddings)
                if r.batch_key() == key and fits and len(batch) < (1 if key[-1] else cfg.max_batch_size):
                    batch.append(r)
                    longest, wanted = max(longest, len(r.prompt)), max(wanted, r.params.max_tokens)
            for request in batch:
                self._queue.remove(request)
                self._running[request.request_id] = request
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Request]) -> None:
        import jax

        from m1jax import generate as gen
        cfg, params = self.config, batch[0].params
        prompts = [r.prompt for r in batch]
        longest = max(len(p) for p in prompts)
        wanted = max(r.params.max_tokens for r in batch)
        bucket = max(cfg.min_new_tokens_bucket, 1 << (wanted - 1).bit_length())
        max_new = max(wanted, min(bucket, self.model_config.max_position_embeddings - longest))
        if cfg.pad_batch:
            prompts = prompts + [[0]] * (cfg.max_batch_size - len(prompts))
        seed = params.seed if (params.temperature > 0 and params.seed is not None) else int(
            self._rng.integers(2 ** 31))
        t0 = time.monotonic()
        try:
            out = gen.generate(self.split, prompts, max_new_tokens=max_new, key=jax.random.key(seed),
                               sampling=gen.Sampling.make(params.temperature, params.top_k, params.top_p),
                               stop=gen.StopRules.make(params.stop_token_ids, params.truncate_after,
                                                       params.truncate_prob, slots=STOP_SLOTS),
                               chunk_size=cfg.chunk_size, kv_dtype=cfg.kv_dtype)
            tokens, logprobs = np.asarray(out.tokens), np.asarray(out.model_logprobs)
            lengths, reasons = np.asarray(out.lengths), np.asarray(out.stop_reason)
        except Exception as e:  # noqa: BLE001 (any failure ends the batch's requests with its message)
            with self._lock:
                for request in batch:
                    if not request.finished:
                        self._finish(request, "error", f"{type(e).__name__}: {e}")
                    self._running.pop(request.request_id, None)
            return
        done = time.monotonic()
        step_s = (done - t0) / max(1, int(lengths[:len(batch)].max()))
        with self._lock:
            for row, request in enumerate(batch):
                self._running.pop(request.request_id, None)
                if request.finished:  # cancelled while running
                    continue
                n, reason = _finish_reason(int(lengths[row]), int(reasons[row]), request.params.max_tokens)
                request.handle.time_to_first_token_s = done - request.submitted
                for i in range(n):
                    request.handle.put(TokenEvent(request.request_id, int(tokens[row, i]), float(logprobs[row, i]),
                                                  finish_reason=reason if i == n - 1 else None))
                request.finished = True
                self._ttft.append(done - request.submitted)
                self._itl.append(step_s)
                self._counts.update(finished=1, generated_tokens=n, prompt_tokens=len(request.prompt))
