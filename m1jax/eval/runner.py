"""Running the long-context tasks: through the HTTP server, an engine, or ``m1jax.generate``; greedy answers.

A *completer* maps prompts to answers: ``complete(samples, vocab) -> list[str]`` (answer text, one per sample).

* ``HttpCompleter(base_url)``: POSTs ``/v1/completions`` to an OpenAI-compatible server (ours or another) with the
  prompt as text (``vocab.join``: token ids joined by spaces for a server without a tokenizer), ``temperature=0``,
  ``max_tokens=sample.max_new_tokens``, ``concurrency`` requests at a time.
* ``EngineCompleter(engine, text)``: submits token ids (``text.encode``, a ``m1jax.serve.text.TokenText``) to a
  ``m1jax.serve.types.Engine`` and decodes the tokens (``text.decode``).
* ``GenerateCompleter(model_or_split, text)``: ``m1jax.generate`` in batches.

All three answer greedily and stop at the tokenizer's end-of-sequence ids, as the server does.

``evaluate(completer, vocab, tasks, lengths, samples, seed)`` generates the samples, runs them and scores them:
``{task: {length: {"score": mean, "scores": [...], "answers": [...]}}}``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import urllib.error
import urllib.request
from typing import Callable, Sequence

import numpy as np

from m1jax.eval.tasks import Sample, Task, get_task, score
from m1jax.eval.vocab import Vocabulary


class HttpCompleter:
    def __init__(self, base_url: str, model: str | None = None, concurrency: int = 4, timeout_s: float = 3600.0):
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model, self.concurrency, self.timeout_s = model, concurrency, timeout_s

    def _one(self, prompt: str, max_tokens: int) -> str:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        if self.model is not None:
            body["model"] = self.model
        request = urllib.request.Request(self.url, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.load(response)["choices"][0]["text"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.url} answered {e.code}: {e.read().decode(errors='replace')[:500]}") from None

    def complete(self, samples: Sequence[Sample], vocab: Vocabulary) -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda s: self._one(s.prompt(vocab), s.max_new_tokens), samples))


class EngineCompleter:
    def __init__(self, engine, text):
        self.engine, self.text = engine, text

    def complete(self, samples: Sequence[Sample], vocab: Vocabulary) -> list[str]:
        from m1jax.serve.types import SamplingParams
        self.engine.start()
        handles = [self.engine.submit(self.text.encode(s.prompt(vocab)),
                                      SamplingParams(max_tokens=s.max_new_tokens, temperature=0.0,
                                                     stop_token_ids=self.text.eos_token_ids))
                   for s in samples]
        return [self.text.decode(h.result().token_ids) for h in handles]


class GenerateCompleter:
    def __init__(self, model_or_split, text, batch_size: int = 8, chunk_size: int = 512, kv_dtype: str | None = None):
        from flax import nnx
        self.split = nnx.split(model_or_split) if isinstance(model_or_split, nnx.Module) else model_or_split
        self.text, self.batch_size, self.chunk_size, self.kv_dtype = text, batch_size, chunk_size, kv_dtype

    def complete(self, samples: Sequence[Sample], vocab: Vocabulary) -> list[str]:
        from m1jax import generate as gen
        answers = []
        for at in range(0, len(samples), self.batch_size):
            batch = samples[at:at + self.batch_size]
            out = gen.generate(self.split, [self.text.encode(s.prompt(vocab)) for s in batch],
                               max_new_tokens=max(s.max_new_tokens for s in batch), sampling=gen.Sampling.greedy(),
                               stop=gen.StopRules.make(self.text.eos_token_ids, truncate_after=0),
                               chunk_size=self.chunk_size,
                               kv_dtype=self.kv_dtype)
            tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
            answers += [self.text.decode(tokens[i, :min(int(lengths[i]), s.max_new_tokens)].tolist())
                        for i, s in enumerate(batch)]
        return answers


def evaluate(completer, vocab: Vocabulary, tasks: Sequence[str | Task], lengths: Sequence[int], samples: int = 4,
             seed: int = 0, max_new_tokens: int | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Scores of every task (a name or a ``Task``) at every length (module docstring); ``max_new_tokens`` caps the
    tasks' own answer lengths."""
    results: dict = {}
    for task in tasks:
        task = get_task(task) if isinstance(task, str) else task
        name = task.name
        for length in lengths:
            batch = task.samples(vocab, length, samples, seed)
            if max_new_tokens is not None:
                batch = [dataclasses.replace(s, max_new_tokens=min(s.max_new_tokens, max_new_tokens)) for s in batch]
            answers = completer.complete(batch, vocab)
            scores = [score(s, a, vocab) for s, a in zip(batch, answers)]
            results.setdefault(name, {})[length] = {"score": float(np.mean(scores)), "scores": scores,
                                                    "answers": answers}
            if log is not None:
                log(f"{name} @ {length} tokens: {np.mean(scores):.3f} over {len(scores)} samples")
    return results


def parse_length(text: str) -> int:
    """``"4096"``, ``"4k"`` (4096), ``"1m"`` (1048576)."""
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 ** 2}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ValueError(f"length {text!r} is not a number of tokens (e.g. 4096, 4k, 1m)") from None
