"""Shared set-up of the serving tests: one tiny model with two layer periods (so the page pools hold two layers per
period position), one engine configuration whose shapes every test reuses (CPU compile time is scarce), and the
references the engines are compared with (``m1jax.generate`` and the uncached full forward)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import generate as gen
from m1jax.config import ModelConfig, m1_layer_types
from m1jax.model import init_model
from m1jax.serve.config import EngineConfig
from m1jax.serve.engine import ContinuousEngine

# initializer 0.15 gives O(1) logits that differ between positions (0.02 gives near-constant ones).
CFG = ModelConfig.tiny(num_hidden_layers=4, layer_types=m1_layer_types(4, 2), initializer_range=0.15)
TOL = 1e-4
# One bucket each for rows, chunks and contexts: every engine test compiles one prefill and one decode program.
# page_size 4 and snapshot_interval 6: cached prefixes of 6 and 18 tokens end inside a page.
ENGINE = EngineConfig(max_batch=4, max_context=64, page_size=4, chunk_size=8, token_budget=12, snapshot_interval=6,
                      min_decode_rows=4, min_chunk=8, min_context_bucket=64, kv_dtype="float32",
                      prefix_cache_bytes=1 << 20)
REFERENCE_CHUNK = 8


@pytest.fixture(scope="session")
def split():
    return nnx.split(init_model(CFG, seed=3))


def make_engine(split, **overrides) -> ContinuousEngine:
    return ContinuousEngine(split, ENGINE.replace(**overrides))


def random_prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, CFG.vocab_size, n).tolist() for n in lengths]


REFERENCE_NEW = 8
_FILLER = [7] * 40  # a 40-token row pads every reference batch to one prompt bucket (one compiled shape)


def generate_greedy(split, prompts, **stop):
    """m1jax.generate, greedy, ``REFERENCE_NEW`` tokens, on a 4-row batch: up to 3 prompts (<= 40 tokens) and filler
    rows -> per prompt (tokens, raw-model log-probs, stop reason)."""
    assert len(prompts) <= 3 and max(map(len, prompts)) <= len(_FILLER)
    rows = list(prompts) + [_FILLER] * (4 - len(prompts))
    out = gen.generate(split, rows, max_new_tokens=REFERENCE_NEW, sampling=gen.Sampling.greedy(),
                       chunk_size=REFERENCE_CHUNK, kv_dtype="float32",
                       stop=gen.StopRules.make(**{"truncate_after": 0, **stop}))
    return [(np.asarray(out.tokens[i, :int(out.lengths[i])]).tolist(),
             np.asarray(out.model_logprobs[i, :int(out.lengths[i])]), int(out.stop_reason[i]))
            for i in range(len(prompts))]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens).logits


def full_logits(split, sequence, width: int = 64) -> np.ndarray:
    """Uncached forward of one sequence -> [T, V] float32 (right-padded to ``width``: causal, one compiled shape)."""
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(sequence)] = sequence
    return np.asarray(_forward(*split, jnp.asarray(tokens)))[0, :len(sequence)]


def model_logprobs(split, prompt, generated) -> np.ndarray:
    """log p(generated token | everything before it) under the raw model, from the uncached forward."""
    logits = full_logits(split, list(prompt) + list(generated))[len(prompt) - 1:-1]
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    return logp[np.arange(len(generated)), np.asarray(generated)]
