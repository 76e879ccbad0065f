"""Generation: chunked prefill into the hybrid cache, a jitted decode loop with sampling and stop rules.

Functional NNX: split the model once (``graphdef, state = nnx.split(model)``) and pass both to the pure functions
below; ``graphdef`` is static, ``state`` and the cache are traced, and the cache is donated so XLA updates it in place.

* ``prefill(graphdef, state, tokens, cache, chunk_size)``: a left-padded prompt batch [B, P] (``cache.start`` marks
  the padding) run through the model ``chunk_size`` tokens at a time; returns the next-token logits [B, V] and the
  filled cache. Only the KV cache is full-length; every other intermediate is [B, chunk_size, ...].
* ``decode(graphdef, state, logits, cache, key, ...)``: one ``lax.while_loop`` that samples, records and feeds back
  ``max_new_tokens`` tokens, with per-row done flags (stop tokens, M1's early truncation).
* ``generate(model, prompts, ...)``: the host-side convenience (bucketing, padding, cache allocation, both steps).

Static shapes: prompt lengths are bucketed (``bucket_length``), sampling knobs and stop rules are traced values, so
calls with the same bucketed sizes reuse the compiled programs (``TRACE_COUNTS`` counts traces, for tests).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m1jax.cache import HybridCache

# Stop reasons per row.
MAX_LENGTH, STOP_TOKEN, TRUNCATED = 0, 1, 2
# Python-side trace counters of the jitted functions (incremented only while tracing): compilation tests read them.
TRACE_COUNTS: collections.Counter = collections.Counter()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling knobs as traced values (changing them does not recompile): scalars for the whole batch, or [B] arrays
    with one setting per row (``rows``; the serving engine batches requests with different settings).

    temperature 0 means greedy (argmax); top_k 0 disables top-k; top_p 1 disables nucleus filtering (``make``
    checks the domains).
    Order (as transformers): logits / temperature -> top-k -> top-p on the renormalised top-k distribution.
    """
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> "Sampling":
        """Checked settings: temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), 0 < top_p <= 1 (1 = off)."""
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))

    @classmethod
    def greedy(cls) -> "Sampling":
        return cls.make(temperature=0.0)

    @classmethod
    def rows(cls, temperature: Sequence[float], top_k: Sequence[int], top_p: Sequence[float]) -> "Sampling":
        """One setting per row ([B] arrays), each checked as ``make`` checks it."""
        checked = [cls.make(t, k, p) for t, k, p in zip(temperature, top_k, top_p, strict=True)]
        return cls(*(jnp.stack(x) for x in zip(*((s.temperature, s.top_k, s.top_p) for s in checked))))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopRules:
    """stop_tokens [S] int32 (-1 entries are unused slots: a fixed S keeps shapes static), or [B, S] with
    ``truncate_after`` and ``truncate_prob`` [B] for one rule per row (``rows``).

    Early truncation (M1's RL): a row stops once ``truncate_after`` consecutive sampled tokens each had model
    probability (temperature 1) above ``truncate_prob``; ``truncate_after = 0`` disables it.
    """
    stop_tokens: jax.Array
    truncate_after: jax.Array
    truncate_prob: jax.Array

    @classmethod
    def make(cls, stop_tokens: Sequence[int] = (), truncate_after: int = 3000, truncate_prob: float = 0.99,
             slots: int = 8) -> "StopRules":
        ids = [int(t) for t in stop_tokens]
        if any(t < 0 for t in ids):
            raise ValueError(f"stop tokens must be token ids >= 0, got {ids}")
        if int(truncate_after) != truncate_after or truncate_after < 0:
            raise ValueError(f"truncate_after must be an integer >= 0 (0 = off), got {truncate_after}")
        if not 0 <= truncate_prob <= 1:
            raise ValueError(f"truncate_prob must be in [0, 1], got {truncate_prob}")
        if len(ids) > slots:
            raise ValueError(f"at most {slots} stop tokens (pass slots=...), got {len(ids)}")
        return cls(jnp.asarray(ids + [-1] * (slots - len(ids)), jnp.int32), jnp.int32(truncate_after),
                   jnp.float32(truncate_prob))

    @classmethod
    def rows(cls, stop_tokens: Sequence[Sequence[int]], truncate_after: Sequence[int],
             truncate_prob: Sequence[float], slots: int = 8) -> "StopRules":
        """One rule per row ([B, slots] stop tokens, [B] truncation settings), each checked as ``make`` checks it."""
        checked = [cls.make(s, a, p, slots) for s, a, p in zip(stop_tokens, truncate_after, truncate_prob,
                                                                strict=True)]
        return cls(*(jnp.stack(x) for x in zip(*((r.stop_tokens, r.truncate_after, r.truncate_prob)
                                                    for r in checked))))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Per-row results of ``decode`` (N = max_new_tokens). Entries after a row's length hold ``pad_id`` / zeros.

    tokens [B, N] int32; logprobs [B, N] f32 log-prob of each token under the distribution it was sampled from
    (temperature, top-k, top-p applied; 0 for greedy); model_logprobs [B, N] f32 log-prob under the raw model
    (temperature 1, no filtering: what RL needs); max_probs [B, N] f32 max probability of the raw model distribution;
    lengths [B] int32 generated tokens (a stop token counts); stop_reason [B] int32 (MAX_LENGTH, STOP_TOKEN,
    TRUNCATED); logits [B, V] f32 next-token logits after the last fed token; cache after the last fed token.
    """
    tokens: jax.Array
    logprobs: jax.Array
    model_logprobs: jax.Array
    max_probs: jax.Array
    lengths: jax.Array
    stop_reason: jax.Array
    logits: jax.Array
    cache: HybridCache


# ------------------------------------------------------------------------------------------------ sampling
def _column(x: jax.Array) -> jax.Array:
    """A scalar knob or a [B] per-row knob as a column that broadcasts against [B, V]."""
    return jnp.reshape(x, (-1, 1))


def filter_logits(logits: jax.Array, sampling: Sampling, active: bool | None = None) -> jax.Array:
    """logits [B, V] f32 -> logits / temperature with tokens outside top-k / top-p set to -inf.

    One descending sort serves both filters (temperature does not change the order); the sort is skipped when no
    row filters. Ties at a threshold are kept. The knobs are scalars or [B] (``Sampling``).
    ``active``: whether any row filters, when the caller knows it (a static bool: the program has no branch; a
    serving engine knows every row's settings), or None to decide on the device (a ``lax.cond``, whose predicate a
    GPU runtime reads back on the host mid-program). Rows that do not filter come out the same either way.
    """
    temperature = _column(jnp.where(sampling.temperature > 0, sampling.temperature, 1.0))
    scaled = logits / temperature

    def filtered(scaled):
        vocab = scaled.shape[-1]
        ranked = -jnp.sort(-scaled, axis=-1)  # [B, V] descending
        k = _column(jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab))
        ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        # keep the smallest prefix whose mass reaches top_p: token i stays if the mass before it is < top_p
        keep = (jnp.cumsum(probs, axis=-1) - probs) < _column(sampling.top_p)
        keep = keep.at[:, 0].set(True) & (jnp.arange(vocab) < k)
        threshold = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= threshold, scaled, -jnp.inf)

    if active is None:
        return jax.lax.cond(jnp.any((sampling.top_k > 0) | (sampling.top_p < 1)), filtered, lambda s: s, scaled)
    return filtered(scaled) if active else scaled


def _is_key_batch(key: jax.Array) -> bool:
    """True for one PRNG key per row: typed keys [B], raw uint32 keys [B, 2]."""
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def sample_tokens(key: jax.Array, logits: jax.Array, sampling: Sampling, filtering: bool | None = None):
    """logits [B, V] f32 -> (tokens [B] int32, logp under the sampling distribution [B], raw-model logp [B],
    raw-model max probability [B]).

    ``key`` is one PRNG key for the batch, or one per row ([B]: a row's draws then depend only on its own key, so a
    request samples the same tokens whatever it is batched with). ``sampling`` knobs are scalars or [B].
    ``filtering``: ``filter_logits``'s ``active``.
    """
    model_logp = jax.nn.log_softmax(logits, axis=-1)
    filtered = filter_logits(logits, sampling, filtering)
    greedy = sampling.temperature <= 0
    if _is_key_batch(key):
        sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row, axis=-1))(key, filtered)
    else:
        sampled = jax.random.categorical(key, filtered, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    sample_logp = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), tokens[:, None], axis=-1)[:, 0]
    sample_logp = jnp.where(greedy, 0.0, sample_logp)
    token_model_logp = jnp.take_along_axis(model_logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, sample_logp, token_model_logp, jnp.exp(jnp.max(model_logp, axis=-1))


# ------------------------------------------------------------------------------------------------ model steps
def _forward_last(graphdef, state, tokens, cache):
    """tokens [B, T] through the model with the cache -> (logits of the last position [B, V] f32, new cache).

    Only the last position goes through the LM head (a [B, T, V] chunk would dominate memory for long chunks)."""
    model = nnx.merge(graphdef, state)
    out = model.backbone(tokens, cache=cache)
    return model.logits(out.hidden[:, -1]), out.cache


def _prefill_chunk(graphdef, state, tokens, cache):
    TRACE_COUNTS["prefill_chunk"] += 1
    return _forward_last(graphdef, state, tokens, cache)


_prefill_chunk_jit = jax.jit(_prefill_chunk, static_argnums=0, donate_argnums=3)


def bucket_length(length: int, chunk_size: int, min_bucket: int = 16) -> int:
    """Padded prompt length: the next power of two (>= min_bucket) up to ``chunk_size``, then a multiple of it.

    So a prompt compiles at most log2(chunk_size) first-chunk shapes plus the one full-chunk shape."""
    if length <= 0:
        raise ValueError(f"prompt length must be positive, got {length}")
    if length > chunk_size:
        return -(-length // chunk_size) * chunk_size
    return min(chunk_size, max(min_bucket, 1 << (length - 1).bit_length()))


def prefill(graphdef, state, tokens, cache: HybridCache, chunk_size: int):
    """Run a left-padded prompt batch through the model in chunks.

    Args:
      tokens: [B, P] int (host or device), left-padded; ``cache.start`` [B] = P - prompt length per row, and the
        cache's ``index`` is where the first prompt token goes (0 for a fresh cache). P must be <= chunk_size or a
        multiple of it (``bucket_length``), so every call has one of a few static shapes.
      cache: donated; its KV part must hold index + P + the tokens to be generated.
    Returns (logits [B, V] f32 for the token after the prompt, cache with index advanced by P).
    """
    tokens = np.asarray(tokens, np.int32)
    b, p = tokens.shape
    if p > chunk_size and p % chunk_size:
        raise ValueError(f"prompt length {p} > chunk_size {chunk_size} must be a multiple of it (bucket_length)")
    logits = None
    for s in range(0, p, chunk_size):
        logits, cache = _prefill_chunk_jit(graphdef, state, jnp.asarray(tokens[:, s:s + chunk_size]), cache)
    return logits, cache


def update_stop_state(stop: StopRules, tokens, model_logp, done, run, reason):
    """One step of the per-row stop rules. tokens [B] int32 just sampled, model_logp [B] their raw-model log-prob,
    done [B] bool, run [B] int32 current run of confident tokens, reason [B] int32 -> (done, run, reason).

    M1's early truncation counts consecutive tokens whose model probability exceeds ``truncate_prob``; the row stops
    on the token that makes the run ``truncate_after`` long. A stop token takes precedence over truncation. The
    rules are the batch's or one per row (``StopRules``).
    """
    live = ~done
    run = jnp.where(jnp.exp(model_logp) > stop.truncate_prob, run + 1, 0)
    stop_tokens = stop.stop_tokens if stop.stop_tokens.ndim == 2 else stop.stop_tokens[None, :]
    is_stop = jnp.any(tokens[:, None] == stop_tokens, axis=-1)
    is_trunc = (stop.truncate_after > 0) & (run >= stop.truncate_after)
    reason = jnp.where(live & is_stop, STOP_TOKEN, jnp.where(live & is_trunc, TRUNCATED, reason))
    return done | is_stop | is_trunc, run, reason


def _decode_loop(graphdef, state, logits, cache, key, sampling, stop, max_new_tokens, pad_id):
    TRACE_COUNTS["decode"] += 1
    b = logits.shape[0]
    n = max_new_tokens

    def cond(carry):
        step, done = carry[0], carry[1]
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, done, run, reason, lengths, bufs, logits, cache = carry
        tokens, sample_logp, model_logp, max_prob = sample_tokens(jax.random.fold_in(key, step), logits, sampling)
        live = ~done
        values = (jnp.where(live, tokens, pad_id), jnp.where(live, sample_logp, 0.0),
                  jnp.where(live, model_logp, 0.0), jnp.where(live, max_prob, 0.0))
        bufs = tuple(jax.lax.dynamic_update_slice(buf, v[:, None].astype(buf.dtype), (0, step))
                     for buf, v in zip(bufs, values))
        lengths = lengths + live.astype(jnp.int32)
        done, run, reason = update_stop_state(stop, tokens, model_logp, done, run, reason)
        # Feed the token back (finished rows feed pad_id: their slots lie past their length and are never read).
        logits, cache = _forward_last(graphdef, state, values[0][:, None], cache)
        return step + 1, done, run, reason, lengths, bufs, logits, cache

    zeros = jnp.zeros((b,), jnp.int32)
    bufs = (jnp.full((b, n), pad_id, jnp.int32),) + tuple(jnp.zeros((b, n), jnp.float32) for _ in range(3))
    carry = (jnp.int32(0), jnp.zeros((b,), bool), zeros, zeros, zeros, bufs, logits, cache)
    _, _, _, reason, lengths, bufs, logits, cache = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(*bufs, lengths=lengths, stop_reason=reason, logits=logits, cache=cache)


_decode_loop_jit = jax.jit(_decode_loop, static_argnums=(0, 7, 8), donate_argnums=3)


def decode(graphdef, state, logits, cache: HybridCache, key, *, max_new_tokens: int, sampling: Sampling | None = None,
           stop: StopRules | None = None, pad_id: int = 0) -> GenerateOutput:
    """Sample up to ``max_new_tokens`` tokens per row, starting from next-token ``logits`` [B, V].

    Each step samples from ``logits``, records, then feeds the token at slot ``cache.index`` (so the cache needs
    max_new_tokens free slots and, on return, holds every generated token). The cache is donated.
    """
    sampling = Sampling.make() if sampling is None else sampling
    stop = StopRules.make() if stop is None else stop
    return _decode_loop_jit(graphdef, state, logits, cache, key, sampling, stop, int(max_new_tokens), int(pad_id))


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """Prompts of different lengths -> (tokens [B, length] int32 left-padded, start [B] int32)."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    start = np.zeros((len(prompts),), np.int32)
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= length:
            raise ValueError(f"prompt {i} has length {len(prompt)}; must be in [1, {length}]")
        start[i] = length - len(prompt)
        tokens[i, start[i]:] = prompt
    return tokens, start


def generate(model_or_split, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, key=None,
             sampling: Sampling | None = None, stop: StopRules | None = None, chunk_size: int = 512,
             kv_dtype: str | None = None, pad_id: int = 0) -> GenerateOutput:
    """Prompts (lists of token ids, any lengths) -> ``GenerateOutput``.

    ``model_or_split`` is a model or its ``(graphdef, state)`` (split once and reuse it across calls). The prompt
    batch is left-padded to ``bucket_length(longest, chunk_size)``; the KV cache holds that plus max_new_tokens.
    ``kv_dtype`` defaults to the model's compute dtype.
    """
    graphdef, state = (nnx.split(model_or_split) if isinstance(model_or_split, nnx.Module) else model_or_split)
    cfg = graphdef_config(graphdef, state)
    check_request(cfg, prompts, max_new_tokens, stop)
    length = bucket_length(max(len(p) for p in prompts), chunk_size)
    tokens, start = left_pad(prompts, length, pad_id)
    cache = HybridCache.init(cfg, len(prompts), length + max_new_tokens, kv_dtype=kv_dtype or cfg.compute_dtype,
                             start=jnp.asarray(start))
    logits, cache = prefill(graphdef, state, tokens, cache, chunk_size)
    key = jax.random.key(0) if key is None else key
    return decode(graphdef, state, logits, cache, key, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                  pad_id=pad_id)


def check_prompt_ids(cfg, prompt, label: str = "prompt") -> np.ndarray:
    """One prompt as an integer array [P], or a ValueError naming ``label``: a non-empty 1-D sequence of integer token
    ids in [0, vocab_size) (an id outside would read past the embedding and give NaN or a wrapped row)."""
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"{label} must be a non-empty sequence of token ids; got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{label} holds non-integer token ids ({ids.dtype})")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise ValueError(f"{label}: token ids must be in [0, vocab_size={cfg.vocab_size}); got min {ids.min()}, "
                         f"max {ids.max()}")
    return ids


def check_request(cfg, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: StopRules | None = None):
    """Prompts, lengths and stop tokens against the model: one ValueError naming the problem, before any compile.

    Token ids must be in [0, vocab_size) (an id outside would read past the embedding and give NaN or a wrapped row);
    prompt + max_new_tokens must fit the model's positions.
    """
    if not prompts:
        raise ValueError("no prompts")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        check_prompt_ids(cfg, prompt, f"prompt {i}")
        if len(prompt) + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
    if stop is not None:
        ids = np.asarray(stop.stop_tokens)
        if (ids >= cfg.vocab_size).any():
            raise ValueError(f"stop tokens {ids[ids >= cfg.vocab_size].tolist()} are not in the vocabulary "
                             f"(vocab_size={cfg.vocab_size})")


def graphdef_config(graphdef, state):
    """The ModelConfig of a split model (kept on the module, not in the state)."""
    return nnx.merge(graphdef, state).cfg
