"""What every engine shares: request intake and checks, cancellation, the engine thread, streaming and counters.

A subclass implements ``_step`` (one scheduling iteration on the engine thread; True if it did work), ``_release``
(free what a running request holds) and may override ``_idle_timeout``. All scheduler state is touched only with
``_state_lock`` held: the engine thread holds it for a whole step; ``submit`` never waits for it (requests land in
an inbox), ``cancel`` applies at once when no step is running and otherwise right after the running step.
"""
from __future__ import annotations

import abc
import collections
import itertools
import threading
import time
import traceback

import numpy as np

from m1jax.config import ModelConfig
from m1jax.serve.requests import Request, check_request
from m1jax.serve.types import Engine, RequestHandle, SamplingParams, TokenEvent

# Finish reasons by m1jax.generate's stop reason (MAX_LENGTH, STOP_TOKEN, TRUNCATED).
FINISH_BY_STOP_REASON = ("length", "stop", "truncated")
LATENCY_WINDOW = 4096  # recent TTFT / inter-token samples kept for ``stats``


class EngineLoop(Engine, abc.ABC):
    def __init__(self, model_cfg: ModelConfig, *, max_context: int, max_stop_tokens: int, seed: int):
        self.model_cfg = model_cfg
        self._max_context = max_context
        self._max_stop_tokens = max_stop_tokens
        self._seeds = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._inbox_lock = threading.Lock()
        self._inbox: collections.deque[Request] = collections.deque()
        self._cancels: set[str] = set()
        self._live: dict[str, Request] = {}        # submitted and not finished
        self._state_lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._started = time.perf_counter()
        self.counters = collections.Counter()
        self._ttft = collections.deque(maxlen=LATENCY_WINDOW)
        self._itl = collections.deque(maxlen=LATENCY_WINDOW)

    # ------------------------------------------------------------------------------------------------ subclass API
    @abc.abstractmethod
    def _step(self, new: list[Request]) -> bool:
        """One scheduling iteration with the requests submitted since the last one; True if it did work."""

    @abc.abstractmethod
    def _release(self, request: Request) -> None:
        """Free what a request holds (queued or running) and forget it; its stream is ended by the caller."""

    def _check_capacity(self, prompt: np.ndarray, params: SamplingParams) -> None:
        """Raise ValueError if this engine can never run the (already checked) request."""

    def _recover(self) -> None:
        """Make the engine usable again after a step failed (every request has been ended with an error)."""

    def _idle_timeout(self) -> float | None:
        """How long the thread may sleep when a step did nothing (None: until a request arrives)."""
        return None

    def _queued(self) -> int:
        return 0

    def _running(self) -> int:
        return 0

    # ------------------------------------------------------------------------------------------------ contract
    def submit(self, prompt_ids, params: SamplingParams, request_id: str | None = None) -> RequestHandle:
        prompt = check_request(self.model_cfg, prompt_ids, params, max_context=self._max_context,
                               max_stop_tokens=self._max_stop_tokens)
        self._check_capacity(prompt, params)
        with self._inbox_lock:
            request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
            if request_id in self._live:
                raise ValueError(f"request id {request_id!r} is already in use")
            seed = int(self._seeds.integers(0, 2 ** 32)) if params.seed is None else int(params.seed) % 2 ** 32
            handle = RequestHandle(request_id, int(prompt.size))
            request = Request(request_id, prompt, params, handle, seed, time.perf_counter())
            self._live[request_id] = request
            self._inbox.append(request)
            self.counters["submitted_requests"] += 1
        self._wake.set()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._inbox_lock:
            if request_id not in self._live:
                return
            self._cancels.add(request_id)
        if self._state_lock.acquire(blocking=False):
            try:
                self._apply_cancels()
            finally:
                self._state_lock.release()
        self._wake.set()

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._state_lock:
            for request_id in list(self._live):
                self._cancels.add(request_id)
            self._apply_cancels()

    def stats(self) -> dict:
        with self._inbox_lock:
            inbox = len(self._inbox)
        return {"queued": inbox + self._queued(), "running": self._running(),
                "generated_tokens": self.counters["generated_tokens"], "prompt_tokens": self.counters["prompt_tokens"],
                "cached_prompt_tokens": self.counters["cached_prompt_tokens"],
                "prefilled_tokens": self.counters["prefilled_tokens"], "steps": self.counters["steps"],
                **{f"{what}_requests": self.counters[f"{what}_requests"] for what in ("submitted", "finished",
                                                                                      "cancelled")},
                "ttft_s": list(self._ttft), "itl_s": list(self._itl), "uptime_s": time.perf_counter() - self._started}

    # ------------------------------------------------------------------------------------------------ driving
    def step(self) -> bool:
        """One scheduling iteration on the calling thread (the engine thread calls it; tests may drive it)."""
        with self._state_lock:
            self._apply_cancels()
            with self._inbox_lock:
                new = list(self._inbox)
                self._inbox.clear()
            busy = self._step(new)
            if busy:
                self.counters["steps"] += 1
            self._apply_cancels()
            return busy

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until every submitted request has finished (tests and benchmarks drive the engine without its
        thread this way)."""
        for _ in range(max_steps):
            if not self._live:
                return
            if not self.step():
                wait = self._idle_timeout()
                if wait is None:
                    raise RuntimeError(f"{len(self._live)} requests are live but the engine cannot make progress")
                time.sleep(wait)
        raise RuntimeError(f"still busy after {max_steps} steps")

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                busy = self.step()
            except Exception as e:  # noqa: BLE001  (a failed step ends the requests it touched, not the thread)
                traceback.print_exc()
                self._fail_running(f"{type(e).__name__}: {e}")
                busy = False
            if not busy and not self._stopping:
                self._wake.wait(self._idle_timeout())

    def _fail_running(self, message: str) -> None:
        with self._state_lock:
            with self._inbox_lock:  # requests submitted during the failed step were not part of it
                failed = [r for r in self._live.values() if r not in self._inbox]
            for request in failed:
                self._release(request)
            self._recover()  # before the streams end: a client that sees the error finds the engine usable
            for request in failed:
                self._finish(request, "error", error=message)

    # ------------------------------------------------------------------------------------------------ events
    def _apply_cancels(self) -> None:
        with self._inbox_lock:
            cancels, self._cancels = self._cancels, set()
            cancelled = [self._live[i] for i in cancels if i in self._live]
            for request in cancelled:
                if request in self._inbox:
                    self._inbox.remove(request)
        for request in cancelled:
            self._release(request)
            self._finish(request, "cancelled")

    def _emit(self, request: Request, token: int, logprob: float, finish_reason: str | None = None, *,
              streamed: bool = True) -> None:
        """Send one generated token (the request's last one when ``finish_reason`` is set)."""
        now = time.perf_counter()
        if not request.tokens:
            request.handle.time_to_first_token_s = now - request.submitted
            self._ttft.append(now - request.submitted)
        elif streamed:
            self._itl.append(now - request.last_token_time)
        request.last_token_time = now
        request.tokens.append(token)
        self.counters["generated_tokens"] += 1
        if finish_reason is not None:
            self._forget(request, finish_reason)
        request.handle.put(TokenEvent(request.request_id, int(token), float(logprob), finish_reason))

    def _finish(self, request: Request, finish_reason: str, error: str | None = None) -> None:
        """End a request's stream with no further token."""
        self._forget(request, finish_reason)
        request.handle.put(TokenEvent(request.request_id, None, None, finish_reason, error))

    def _forget(self, request: Request, finish_reason: str) -> None:
        with self._inbox_lock:
            if self._live.pop(request.request_id, None) is not None:  # counted once, whatever ends it
                self.counters["cancelled_requests" if finish_reason == "cancelled" else "finished_requests"] += 1
