"""A request as the engines track it, and the checks every request passes before it is queued."""
from __future__ import annotations

import dataclasses

import numpy as np

from m1jax.config import ModelConfig
from m1jax.generate import check_prompt_ids
from m1jax.serve.types import RequestHandle, SamplingParams


def check_request(cfg: ModelConfig, prompt_ids, params: SamplingParams, *, max_context: int,
                  max_stop_tokens: int) -> np.ndarray:
    """The prompt as int32 [P] if the engine can serve it; else a ValueError that names the problem.

    Token ids must lie in [0, vocab_size) (an id outside reads past the embedding); prompt + max_tokens must fit the
    context the engine was sized for and the model's positions; stop tokens must be token ids, at most
    ``max_stop_tokens`` of them.
    """
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    prompt = check_prompt_ids(cfg, prompt_ids)
    total = prompt.size + params.max_tokens
    if total > max_context:
        raise ValueError(f"prompt of {prompt.size} tokens + max_tokens {params.max_tokens} = {total} exceeds the "
                         f"engine's context of {max_context} tokens")
    if total > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {prompt.size} tokens + max_tokens {params.max_tokens} exceeds the model's "
                         f"max_position_embeddings={cfg.max_position_embeddings}")
    stops = list(params.stop_token_ids)
    if len(stops) > max_stop_tokens:
        raise ValueError(f"at most {max_stop_tokens} stop tokens per request, got {len(stops)}")
    if any(t >= cfg.vocab_size for t in stops):
        raise ValueError(f"stop tokens {[t for t in stops if t >= cfg.vocab_size]} are not in the vocabulary "
                         f"(vocab_size={cfg.vocab_size})")
    return prompt.astype(np.int32)


@dataclasses.dataclass(eq=False)
class Request:
    """One request from submission to its last event. The continuous engine fills the sequence fields."""
    request_id: str
    prompt: np.ndarray                     # [P] int32
    params: SamplingParams
    handle: RequestHandle
    seed: int                              # the request's own or one drawn by the engine
    submitted: float                       # time.perf_counter() at submission
    tokens: list = dataclasses.field(default_factory=list)
    last_token_time: float | None = None
    # sequence state (continuous engine)
    slot: int = -1                         # lightning state slot (0 = none; slot 0 is scratch)
    # page table, int32 [n] from admission on: page i holds tokens i*ps .. (i+1)*ps - 1
    pages: np.ndarray | list = dataclasses.field(default_factory=list)
    length: int = 0                        # tokens in the cache
    node: object = None                    # prefix-cache node the next snapshot extends (None: do not cache)
    next_token: int | None = None          # the last token read back (None: not decoding); fed by the next step
    #                                        unless a step in flight already feeds the token after it (pending)
    run: int = 0                           # M1's truncation: current run of confident tokens (as of next_token)
    pending: int = 0                       # decode steps dispatched for it whose results are not read yet

    @property
    def prefilling(self) -> bool:
        return self.length < self.prompt.size

    @property
    def max_cached_tokens(self) -> int:
        """Tokens this request may ever write: its prompt and every generated token but the last (never fed)."""
        return self.prompt.size + self.params.max_tokens - 1
