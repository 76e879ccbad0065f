"""The OpenAI-compatible HTTP server over any ``m1jax.serve.types.Engine`` (FastAPI; run with uvicorn).

Endpoints:

* ``POST /v1/completions``: ``prompt`` as text, token ids, or a list of either (one choice per prompt);
  ``max_tokens`` (default 16), ``temperature``, ``top_p``, ``top_k`` (extension), ``stop`` (strings; needs a
  tokenizer), ``stop_token_ids`` (extension), ``seed``, ``logprobs`` (0: the sampled tokens' log-probs),
  ``stream``.
* ``POST /v1/chat/completions``: ``messages`` rendered with the model's chat template (``m1jax.serve.chat``), the
  same sampling fields; ``max_tokens`` defaults to the rest of the context.
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format).

Streaming answers are server-sent events (``data: {json}\\n\\n``, then ``data: [DONE]\\n\\n``). Errors are OpenAI's
error JSON with a 4xx status (``m1jax.serve.openai_protocol``). A client that disconnects, streaming or not, cancels
its requests in the engine, which frees their slots. With a tokenizer the end-of-sequence ids stop generation (unless
``ignore_eos``); without one (the tiny presets) a text prompt is whitespace-separated token ids and the completion
text is the generated ids joined by spaces.

Metrics: gauges and counters from ``Engine.stats()`` (queue length, running requests, tokens, tokens/s between
scrapes, prefix-cache hit rate, quantiles of the engine's recent TTFT and inter-token latencies) and cumulative
histograms of each request's time to first token (the engine's measurement) and of the inter-token gaps as the
server receives the tokens.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import json
import threading
import time
from typing import AsyncIterator, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from m1jax.config import ConfigError
from m1jax.serve import openai_protocol as api
from m1jax.serve.chat import ChatTemplate
from m1jax.serve.text import StopStrings, TokenIdText, TokenText
from m1jax.serve.types import Engine, SamplingParams

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# ------------------------------------------------------------------------------------------------ one request
class _Generation:
    """One prompt in the engine: its events turned into text, cut at stop strings."""

    def __init__(self, engine: Engine, text: TokenText, prompt: list[int], params: SamplingParams,
                 stops: Sequence[str]):
        self.engine, self.text = engine, text
        self.prompt = prompt
        self.submitted = time.monotonic()
        self.handle = engine.submit(prompt, params, api.new_id("req"))
        self.decoder = text.decoder()
        self.stops = StopStrings(stops)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.pieces: list[str] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.first_token_at: float | None = None
        self.gaps: list[float] = []
        self.recorded = False  # counted in the metrics
        self._last_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, event) -> tuple[str, int]:
        """Consume one engine event -> (text to show now, tokens it added)."""
        if self.done:
            return "", 0
        added, delta = 0, ""
        if event.token_id is not None:
            now = time.monotonic()
            if self._last_token_at is None:
                self.first_token_at = now
            else:
                self.gaps.append(now - self._last_token_at)
            self._last_token_at = now
            self.token_ids.append(event.token_id)
            self.logprobs.append(event.logprob)
            added = 1
            delta = self.stops.push(self.decoder.push(event.token_id))
            if self.stops.stopped:  # our own stop: the engine's remaining tokens for it are not needed
                self.finish_reason = "stop"
                self.engine.cancel(self.handle.request_id)
        if event.finish_reason is not None and not self.done:
            delta += self.stops.push(self.decoder.flush())
            delta += self.stops.flush()
            self.finish_reason = "stop" if self.stops.stopped else event.finish_reason
            self.error = event.error
        self.pieces.append(delta)
        return delta, added

    def cancel(self) -> None:
        if not self.done:
            self.finish_reason = "cancelled"
            self.engine.cancel(self.handle.request_id)

    @property
    def output(self) -> str:
        return "".join(self.pieces)

    def token_texts(self, start: int = 0) -> list[str]:
        return [self.text.token_text(t) for t in self.token_ids[start:]]

    def time_to_first_token(self) -> float | None:
        engine_ttft = self.handle.time_to_first_token_s
        if engine_ttft is not None:
            return engine_ttft
        return None if self.first_token_at is None else self.first_token_at - self.submitted


# ------------------------------------------------------------------------------------------------ metrics
class _Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == float("inf") else repr(bound)}"}} {running}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """The server's Prometheus metrics (module docstring)."""
    PREFIX = "m1jax"

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = _Histogram(LATENCY_BUCKETS_S)
        self.itl = _Histogram(LATENCY_BUCKETS_S)
        self.requests = collections.Counter()  # finish reason -> count
        self.errors = collections.Counter()    # HTTP status -> count
        self._last: tuple[float, int] | None = None  # (uptime, generated tokens) at the previous scrape

    def finished(self, generation: _Generation) -> None:
        with self._lock:
            self.requests[generation.finish_reason or "cancelled"] += 1
            ttft = generation.time_to_first_token()
            if ttft is not None:
                self.ttft.observe(ttft)
            for gap in generation.gaps:
                self.itl.observe(gap)

    def error(self, status: int) -> None:
        with self._lock:
            self.errors[status] += 1

    def render(self, stats: dict) -> str:
        p = self.PREFIX
        lines: list[str] = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP {p}_{name} {help_}")
            lines.append(f"# TYPE {p}_{name} {kind}")
            for labels, value in samples:
                lines.append(f"{p}_{name}{labels} {value!r}" if isinstance(value, float) else
                             f"{p}_{name}{labels} {value}")

        with self._lock:
            uptime, generated = float(stats.get("uptime_s", 0.0)), int(stats.get("generated_tokens", 0))
            since, before = self._last if self._last is not None else (0.0, 0)
            rate = (generated - before) / (uptime - since) if uptime > since else 0.0
            self._last = (uptime, generated)
            prompt, cached = int(stats.get("prompt_tokens", 0)), int(stats.get("cached_prompt_tokens", 0))
            metric("queued_requests", "gauge", "Requests waiting in the engine's queue.",
                   [("", int(stats.get("queued", 0)))])
            metric("running_requests", "gauge", "Requests the engine is running.",
                   [("", int(stats.get("running", 0)))])
            metric("generated_tokens_total", "counter", "Tokens generated.", [("", generated)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", prompt)])
            metric("cached_prompt_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
                   [("", cached)])
            metric("generation_tokens_per_second", "gauge", "Tokens generated per second since the previous scrape.",
                   [("", float(rate))])
            metric("prefix_cache_hit_rate", "gauge", "Cached prompt tokens / prompt tokens.",
                   [("", float(cached / prompt) if prompt else 0.0)])
            metric("uptime_seconds", "gauge", "Engine uptime.", [("", uptime)])
            for key, name, help_ in (("ttft_s", "engine_time_to_first_token_seconds", "recent TTFT"),
                                     ("itl_s", "engine_inter_token_latency_seconds", "recent inter-token latency")):
                samples = np.asarray(stats.get(key) or [], np.float64)
                quantiles = ([(f'{{quantile="{q}"}}', float(np.quantile(samples, q))) for q in (0.5, 0.9, 0.99)]
                             if samples.size else [])
                metric(name, "gauge", f"Quantiles of the engine's {help_} samples (Engine.stats).", quantiles)
            lines.append(f"# HELP {p}_time_to_first_token_seconds Time from submission to a request's first token.")
            lines.append(f"# TYPE {p}_time_to_first_token_seconds histogram")
            lines += [f"{p}_{line}" for line in self.ttft.lines("time_to_first_token_seconds")]
            lines.append(f"# HELP {p}_inter_token_latency_seconds Gaps between a request's tokens at the server.")
            lines.append(f"# TYPE {p}_inter_token_latency_seconds histogram")
            lines += [f"{p}_{line}" for line in self.itl.lines("inter_token_latency_seconds")]
            metric("requests_total", "counter", "Finished requests by finish reason.",
                   [(f'{{finish_reason="{r}"}}', c) for r, c in sorted(self.requests.items())])
            metric("http_errors_total", "counter", "Error answers by HTTP status.",
                   [(f'{{status="{s}"}}', c) for s, c in sorted(self.errors.items())])
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the server
@dataclasses.dataclass
class ServedModel:
    """What the server needs to know of the model besides the engine."""
    name: str
    vocab_size: int
    max_model_len: int
    text: TokenText = dataclasses.field(default_factory=TokenIdText)

    @property
    def has_tokenizer(self) -> bool:
        return not isinstance(self.text, TokenIdText)


class OpenAIServer:
    """Request handling, independent of the web framework (``create_app`` wires it into FastAPI)."""

    def __init__(self, engine: Engine, model: ServedModel):
        self.engine, self.model = engine, model
        self.metrics = Metrics()
        self.chat_template = (ChatTemplate(model.text.chat_template, model.text.special_tokens)
                              if model.text.chat_template else None)

    # ---------------------------------------------------------------------------------------------- requests
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model.name:
            raise api.APIError(f"The model `{name}` does not exist (this server serves `{self.model.name}`)",
                               status=404, param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], index: int) -> None:
        if not ids:
            raise api.APIError(f"prompt {index} is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise api.APIError(f"prompt {index}: token ids {bad[:5]} are out of the vocabulary (vocab_size="
                               f"{self.model.vocab_size})", param="prompt")

    def encode(self, text: str, index: int) -> list[int]:
        try:
            ids = self.model.text.encode(text)
        except ValueError as e:
            raise api.APIError(str(e), param="prompt") from None
        self.check_prompt(ids, index)
        return ids

    def completion_prompts(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self.encode(prompt, 0)]
        if not prompt:
            raise api.APIError("prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            self.check_prompt(prompt, 0)
            return [list(prompt)]
        out = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                out.append(self.encode(p, i))
            else:
                self.check_prompt(p, i)
                out.append(list(p))
        return out

    def chat_prompt(self, request: api.ChatCompletionRequest) -> list[int]:
        if self.chat_template is None:
            raise api.APIError("this model has no chat template (it needs a tokenizer with a chat_template in "
                               "its tokenizer_config.json); use /v1/completions", param="messages")
        if not request.messages:
            raise api.APIError("messages must not be empty", param="messages")
        kwargs = dict(request.chat_template_kwargs or {})
        try:
            text = self.chat_template.render(request.messages, add_generation_prompt=request.add_generation_prompt,
                                             tools=request.tools, **kwargs)
        except Exception as e:  # noqa: BLE001 (a template's own error message is the most useful answer)
            raise api.APIError(f"the chat template failed on these messages: {type(e).__name__}: {e}",
                               param="messages") from None
        ids = self.model.text.encode(text, add_special_tokens=False)
        self.check_prompt(ids, 0)
        return ids

    def sampling(self, request, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = self.model.max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1:
            raise api.APIError(f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise api.APIError(f"This model's maximum context length is {self.model.max_model_len} tokens. However, "
                               f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                               f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                               param="max_tokens")
        if request.stop and not self.model.has_tokenizer:
            raise api.APIError("stop strings need a tokenizer and this model has none; use stop_token_ids",
                               param="stop")
        bad = [t for t in request.stop_token_ids or [] if not 0 <= t < self.model.vocab_size]
        if bad:
            raise api.APIError(f"stop_token_ids {bad} are out of the vocabulary (vocab_size="
                               f"{self.model.vocab_size})", param="stop_token_ids")
        stop_ids = list(request.stop_token_ids or [])
        if not request.ignore_eos:
            stop_ids += [t for t in self.model.text.eos_token_ids if t not in stop_ids]
        try:
            return SamplingParams(max_tokens=max_tokens,
                                  temperature=1.0 if request.temperature is None else request.temperature,
                                  top_p=1.0 if request.top_p is None else request.top_p,
                                  top_k=request.top_k or 0, stop_token_ids=tuple(stop_ids), seed=request.seed)
        except ConfigError as e:
            raise api.APIError(str(e), param=str(e).split(" ")[0]) from None

    def start(self, prompts: list[list[int]], request, max_tokens: int | None) -> list[_Generation]:
        """Submit every prompt (all or none: a refused prompt cancels the ones already submitted)."""
        generations: list[_Generation] = []
        try:
            for prompt in prompts:
                params = self.sampling(request, len(prompt), max_tokens)
                try:
                    generations.append(_Generation(self.engine, self.model.text, prompt, params,
                                                   request.stop_strings()))
                except ValueError as e:
                    raise api.APIError(str(e)) from None
                except RuntimeError as e:  # the engine is stopping
                    raise api.APIError(str(e), status=503, type="server_error") from None
        except BaseException:
            for g in generations:
                g.cancel()
            raise
        return generations

    # ---------------------------------------------------------------------------------------------- running
    async def _events(self, generations: list[_Generation]) -> AsyncIterator[tuple[int, str, int]]:
        """(choice index, text delta, tokens added) for every event until each generation is done."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, g):
            try:
                async for event in g.handle.stream():
                    await queue.put((i, event))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(generations)]
        try:
            live = len(generations)
            while live:
                i, event = await queue.get()
                if event is None:
                    live -= 1
                    continue
                g = generations[i]
                was_done = g.done
                delta, added = g.feed(event)
                if not was_done and (delta or added or g.done):
                    yield i, delta, added
        finally:
            for task in tasks:
                task.cancel()

    def finish(self, generations: list[_Generation]) -> None:
        """Cancel what is still running and record each generation once (idempotent)."""
        for g in generations:
            g.cancel()  # no-op for a finished one
            if not g.recorded:
                g.recorded = True
                self.metrics.finished(g)

    async def collect(self, generations: list[_Generation], disconnected: asyncio.Future) -> bool:
        """Run to the end; False if the client disconnected first (its generations are cancelled)."""
        async def drain():
            async for _ in self._events(generations):
                pass

        work = asyncio.ensure_future(drain())
        try:
            done, _ = await asyncio.wait({work, disconnected}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                work.cancel()
                return False
            work.result()
            return True
        finally:
            self.finish(generations)

    def error_of(self, generations: list[_Generation]) -> api.APIError | None:
        for g in generations:
            if g.finish_reason == "error":
                return api.APIError(f"generation failed: {g.error}", status=500, type="server_error")
        return None

    # ---------------------------------------------------------------------------------------------- answers
    def completion_body(self, request, generations, request_id) -> dict:
        choices = []
        for i, g in enumerate(generations):
            choice = {"index": i, "text": g.output, "logprobs": None,
                      "finish_reason": api.FINISH_REASONS[g.finish_reason]}
            if request.logprobs is not None:
                choice["logprobs"] = api.completion_logprobs(g.token_texts(), g.logprobs, 0)
            if request.return_token_ids:
                choice.update(prompt_token_ids=g.prompt, token_ids=g.token_ids)
            choices.append(choice)
        return api.envelope("completion", request_id, self.model.name, choices, usage_=self._usage(generations))

    def chat_body(self, request, generation, request_id) -> dict:
        g = generation
        choice = {"index": 0, "message": {"role": "assistant", "content": g.output}, "logprobs": None,
                  "finish_reason": api.FINISH_REASONS[g.finish_reason]}
        if request.logprobs:
            choice["logprobs"] = api.chat_logprobs(g.token_texts(), g.logprobs)
        if request.return_token_ids:
            choice.update(prompt_token_ids=g.prompt, token_ids=g.token_ids)
        return api.envelope("chat", request_id, self.model.name, [choice], usage_=self._usage([g]))

    def _usage(self, generations) -> dict:
        return api.usage(sum(len(g.prompt) for g in generations), sum(len(g.token_ids) for g in generations),
                         sum(g.handle.cached_prompt_tokens for g in generations))

    async def stream(self, kind: str, request, generations, request_id) -> AsyncIterator[str]:
        """Server-sent events of a streamed answer. Cancellation (the client went away) cancels the generations."""
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        name = self.model.name
        shown = [0] * len(generations)  # tokens already reported per choice (for log-probs)
        text_at = [0] * len(generations)
        details = request.return_token_ids or (request.logprobs if kind == "chat" else request.logprobs is not None)
        try:
            if kind == "chat":
                yield sse(api.envelope("chat", request_id, name, [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}], stream=True))
            async for i, delta, _ in self._events(generations):
                g = generations[i]
                if not (delta or g.done or details):
                    continue  # text held back (a possible stop string, an incomplete character): nothing to send
                if g.finish_reason == "error":
                    yield sse(api.APIError(f"generation failed: {g.error}", status=500, type="server_error").body())
                    break
                new_tokens = g.token_texts(shown[i])
                lps = g.logprobs[shown[i]:]
                reason = api.FINISH_REASONS[g.finish_reason] if g.done else None
                if kind == "chat":
                    choice = {"index": 0, "delta": {"content": delta} if delta else {},
                              "logprobs": api.chat_logprobs(new_tokens, lps) if request.logprobs else None,
                              "finish_reason": reason}
                else:
                    choice = {"index": i, "text": delta, "finish_reason": reason,
                              "logprobs": (api.completion_logprobs(new_tokens, lps, text_at[i])
                                           if request.logprobs is not None else None)}
                if request.return_token_ids:
                    choice["token_ids"] = g.token_ids[shown[i]:]
                shown[i], text_at[i] = len(g.token_ids), text_at[i] + len(delta)
                yield sse(api.envelope(kind, request_id, name, [choice], stream=True))
            else:
                if request.stream_options is not None and request.stream_options.include_usage:
                    yield sse(api.envelope(kind, request_id, name, [], stream=True,
                                           usage_=self._usage(generations)))
                yield "data: [DONE]\n\n"
        finally:
            self.finish(generations)


async def _wait_disconnect(request) -> None:
    """Returns when the client has gone (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Engine, model: ServedModel):
    """The FastAPI application serving ``engine`` (started and stopped with the app)."""
    server = OpenAIServer(engine, model)

    class EventStream(StreamingResponse):
        """Server-sent events; ``on_close`` runs however the response ends, even when the client left before the
        stream started (then the generator never runs, and its own clean-up with it)."""

        def __init__(self, content, on_close):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.on_close = on_close

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="m1jax", lifespan=lifespan)
    app.state.server = server

    def error_response(e: api.APIError) -> JSONResponse:
        server.metrics.error(e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(api.APIError)
    async def on_api_error(request, e: api.APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):
        return error_response(api.APIError(str(e.detail), status=e.status_code,
                                           type="not_found_error" if e.status_code == 404 else "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):
        return error_response(api.APIError(str(e)))

    async def answer(request: Request, kind: str, parsed, generations):
        request_id = api.new_id("cmpl" if kind == "completion" else "chatcmpl")
        if parsed.stream:
            return EventStream(server.stream(kind, parsed, generations, request_id),
                               on_close=lambda: server.finish(generations))
        disconnected = asyncio.ensure_future(_wait_disconnect(request))
        try:
            finished = await server.collect(generations, disconnected)
        finally:
            disconnected.cancel()
        if not finished:  # nobody to answer
            return PlainTextResponse("client disconnected", status_code=499)
        error = server.error_of(generations)
        if error is not None:
            return error_response(error)
        if kind == "completion":
            return JSONResponse(server.completion_body(parsed, generations, request_id))
        return JSONResponse(server.chat_body(parsed, generations[0], request_id))

    @app.post("/v1/completions")
    async def completions(request: Request):
        parsed = api.parse_request(await request.body(), api.CompletionRequest)
        server.check_model(parsed.model)
        prompts = server.completion_prompts(parsed.prompt)
        return await answer(request, "completion", parsed, server.start(prompts, parsed, parsed.max_tokens))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        parsed = api.parse_request(await request.body(), api.ChatCompletionRequest)
        server.check_model(parsed.model)
        prompt = server.chat_prompt(parsed)
        max_tokens = parsed.max_completion_tokens if parsed.max_tokens is None else parsed.max_tokens
        return await answer(request, "chat", parsed, server.start([prompt], parsed, max_tokens))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0, "owned_by": "m1jax",
                                            "max_model_len": model.max_model_len}]}

    @app.get("/health")
    async def health():
        try:
            stats = engine.stats()
        except Exception as e:  # noqa: BLE001 (any failure means unhealthy)
            return JSONResponse({"status": "error", "error": f"{type(e).__name__}: {e}"}, status_code=503)
        return {"status": "ok", "queued": stats.get("queued", 0), "running": stats.get("running", 0)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(engine.stats()),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level)
