"""The OpenAI HTTP API's requests, responses and errors (the subset the server implements).

Requests are validated strictly: a field of the wrong type or a field the API does not define is a 400 error whose
message names the field (as OpenAI's API answers). Fields the API defines but this server does not implement are
accepted only at their neutral value (``n=1``, ``echo=false``, ``presence_penalty=0``, ...); any other value is a
400 naming the field. Extensions (as vLLM names them): ``top_k``, ``stop_token_ids``, ``ignore_eos``,
``return_token_ids``, and for chat ``chat_template_kwargs`` and ``add_generation_prompt``.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

TokenIds = list[int]


class APIError(Exception):
    """An error answered as OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields completions and chat share."""
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None                    # extension
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None     # extension
    ignore_eos: bool = False                    # extension: do not stop at the tokenizer's end-of-sequence ids
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False              # extension: prompt and generated token ids in each choice

    def check_unsupported(self) -> None:
        neutral = {"n": (self.n, 1), "presence_penalty": (self.presence_penalty or 0, 0),
                   "frequency_penalty": (self.frequency_penalty or 0, 0), "logit_bias": (self.logit_bias or None, None)}
        for name, (value, wanted) in neutral.items():
            if value != wanted:
                raise APIError(f"{name}={value!r} is not supported by this server (only {wanted!r})", param=name)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise APIError("echo=true is not supported by this server (prompt log-probs are not computed)",
                           param="echo")
        if self.best_of not in (None, 1):
            raise APIError(f"best_of={self.best_of} is not supported by this server (only 1)", param="best_of")
        if self.suffix:
            raise APIError("suffix is not supported by this server", param="suffix")
        if self.logprobs is not None and self.logprobs != 0:
            raise APIError(f"logprobs={self.logprobs}: this server returns only the sampled tokens' log-probs "
                           "(logprobs=0), not the most likely alternatives", param="logprobs")


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True          # extension
    chat_template_kwargs: dict[str, Any] | None = None  # extension

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs:
            raise APIError(f"top_logprobs={self.top_logprobs}: this server returns only the sampled tokens' "
                           "log-probs (top_logprobs=0)", param="top_logprobs")
        if self.response_format not in (None, {"type": "text"}):
            raise APIError("response_format other than text is not supported by this server",
                           param="response_format")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError("tool_choice other than none/auto is not supported by this server", param="tool_choice")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise APIError("give max_tokens or max_completion_tokens, not both", param="max_tokens")
        for i, message in enumerate(self.messages):
            check_message(message, i)


ROLES = ("system", "developer", "user", "assistant", "tool")


def check_message(message: dict, index: int) -> None:
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise APIError(f"messages[{index}].role must be one of {list(ROLES)}, got {role!r}",
                       param=f"messages[{index}].role")
    if content is None and role != "assistant":
        raise APIError(f"messages[{index}].content is required", param=f"messages[{index}].content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"messages[{index}].content[{j}] must be a text part {{'type': 'text', 'text': "
                               f"...}} (this model reads text only)", param=f"messages[{index}].content")
    elif content is not None and not isinstance(content, str):
        raise APIError(f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


_FIELD_HELP = {
    "prompt": "a string, a list of strings, a list of token ids or a list of lists of token ids",
    "stop": "a string or a list of strings",
}


def parse_request(body: bytes, cls: type[_Request]):
    """The validated request, or APIError(400) naming the problem."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        raise APIError(_describe(e.errors()), param=str(e.errors()[0]["loc"][0])) from None
    request.check_unsupported()
    return request


def _describe(errors: list[dict]) -> str:
    first = errors[0]
    field = str(first["loc"][0]) if first["loc"] else "body"
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {field}"
    if first["type"] == "missing":
        return f"missing required field: {field}"
    if field in _FIELD_HELP:
        return f"{field} must be {_FIELD_HELP[field]}"
    where = ".".join(str(x) for x in first["loc"])
    return f"{where}: {first['msg']}"


# ------------------------------------------------------------------------------------------------ responses
FINISH_REASONS = {"stop": "stop", "length": "length", "truncated": "length", "cancelled": "abort", "error": "error"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int) -> dict:
    """The ``logprobs`` object of a completion choice (``offset``: text length before these tokens)."""
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs)]}


def envelope(kind: Literal["completion", "chat"], request_id: str, model: str, choices: list[dict],
             stream: bool = False, usage_: dict | None = None) -> dict:
    objects = {("completion", False): "text_completion", ("completion", True): "text_completion",
               ("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk"}
    out = {"id": request_id, "object": objects[kind, stream], "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
