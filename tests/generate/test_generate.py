"""Generation against independent computations: the full (uncached) forward, each row alone, transformers' generate,
and NumPy implementations of the sampling filters and the stop rules.

Shapes are chosen so the whole file compiles few programs (CPU time is scarce): batch 3 or 1, chunk 8, prompt bucket
16, 8 new tokens.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m1jax import generate as gen
from m1jax.cache import HybridCache
from m1jax.config import ModelConfig
from m1jax.model import init_model

# initializer 0.15 gives O(1) logits that differ between positions (0.02 gives near-constant ones).
CFG = ModelConfig.tiny(initializer_range=0.15)
TOL = 1e-4
# bf16 compute, cached against uncached: measured equal on CPU (both paths round the same bf16 activations); a bf16
# step at these magnitudes is ~1e-2, so a reordered sum may move them by that much; a lost or misplaced K/V by O(1)
# (the same model in fp32 differs from it by 3.7).
BF16_TOL = 5e-2
CHUNK, NEW = 8, 8
PROMPT_LENGTHS = (9, 13, 16)  # one bucket (16 = two chunks); row 0 and 1 are left-padded


@pytest.fixture(scope="module")
def split():
    return nnx.split(init_model(CFG, seed=3))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(1, CFG.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens).logits


def _full_logits(split, sequences, width=32, rows=3):
    """Uncached full forward of unpadded sequences -> list of [T_i, V] float32 (the reference).

    Right-padding to one [rows, width] shape (causal: padding after a token cannot change its logits) keeps this
    to a single compilation."""
    tokens = np.zeros((rows, width), np.int32)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = seq
    logits = np.asarray(_forward(*split, jnp.asarray(tokens)))
    return [logits[i, :len(seq)] for i, seq in enumerate(sequences)]


def _greedy(split, prompts, **kw):
    return gen.generate(split, prompts, max_new_tokens=NEW, sampling=gen.Sampling.greedy(), chunk_size=CHUNK,
                        kv_dtype="float32", **kw)


@pytest.fixture(scope="module")
def greedy_batch(split, prompts):
    return _greedy(split, prompts, stop=gen.StopRules.make(truncate_after=0))


def test_chunked_prefill_and_decode_logits_equal_full_forward_at_every_position(split, prompts):
    tokens = prompts[2] + prompts[1]  # 29 tokens: a 20-token prompt left-padded to 3 chunks of 8, then 9 decode steps
    full = _full_logits(split, [tokens])[0]
    prompt_len = 20
    bucket = gen.bucket_length(prompt_len, CHUNK)
    padded, start = gen.left_pad([tokens[:prompt_len]], bucket)
    cache = HybridCache.init(CFG, 1, bucket + len(tokens) - prompt_len, kv_dtype="float32", start=jnp.asarray(start))
    logits, cache = gen.prefill(*split, padded, cache, CHUNK)
    got = [np.asarray(logits[0])]
    for t in tokens[prompt_len:]:  # the single-token decode step, one position at a time
        logits, cache = gen._prefill_chunk_jit(*split, jnp.asarray([[t]], jnp.int32), cache)
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.stack(got), full[prompt_len - 1:], rtol=0, atol=TOL)
    assert float(np.std(full)) > 0.3  # the comparison is not between near-constant logits


def test_generated_logprobs_equal_full_forward(split, prompts, greedy_batch):
    out = greedy_batch
    assert out.tokens.shape == (3, NEW) and np.all(np.asarray(out.lengths) == NEW)
    assert np.all(np.asarray(out.stop_reason) == gen.MAX_LENGTH)
    sequences = [prompt + np.asarray(out.tokens[row]).tolist() for row, prompt in enumerate(prompts)]
    for row, (prompt, all_logits) in enumerate(zip(prompts, _full_logits(split, sequences))):
        new = sequences[row][len(prompt):]
        full = all_logits[len(prompt) - 1:-1]  # logits that chose each new token
        logp = jax.nn.log_softmax(full, axis=-1)
        np.testing.assert_array_equal(new, np.argmax(full, -1))
        np.testing.assert_allclose(out.model_logprobs[row], logp[np.arange(NEW), new], rtol=0, atol=TOL)
        np.testing.assert_allclose(out.max_probs[row], np.exp(np.max(logp, -1)), rtol=0, atol=TOL)
        np.testing.assert_array_equal(out.logprobs[row], 0.0)  # greedy: a point mass
        # the returned next-token logits continue the sequence
        np.testing.assert_allclose(out.logits[row], all_logits[-1], rtol=0, atol=TOL)


def test_mixed_length_batch_equals_each_row_alone(split, prompts, greedy_batch):
    for row, prompt in enumerate(prompts):
        alone = _greedy(split, [prompt], stop=gen.StopRules.make(truncate_after=0))
        np.testing.assert_array_equal(alone.tokens[0], greedy_batch.tokens[row])
        np.testing.assert_allclose(alone.model_logprobs[0], greedy_batch.model_logprobs[row], rtol=0, atol=TOL)


def test_lightning_cache_does_not_grow_with_length(split, prompts, greedy_batch):
    longer = gen.generate(split, prompts, max_new_tokens=4 * NEW, sampling=gen.Sampling.greedy(), chunk_size=CHUNK,
                          kv_dtype="float32")
    short, long_ = greedy_batch.cache, longer.cache
    assert short.lightning_bytes() == long_.lightning_bytes() > 0
    assert long_.kv_bytes() > short.kv_bytes()
    for a, b in zip(short.layers, long_.layers):
        if "state" in a:
            assert a["state"].shape == b["state"].shape and a["state"].dtype == jnp.float32
    assert int(long_.index) == 16 + 4 * NEW


def test_stop_token_ends_a_row(split, prompts, greedy_batch):
    stop_at = int(greedy_batch.tokens[1, 2])
    first = int(np.argmax(np.asarray(greedy_batch.tokens[1]) == stop_at)) + 1
    out = _greedy(split, prompts, stop=gen.StopRules.make([stop_at], truncate_after=0))
    length = int(out.lengths[1])
    assert length == first and int(out.stop_reason[1]) == gen.STOP_TOKEN
    np.testing.assert_array_equal(out.tokens[1, :length], greedy_batch.tokens[1, :length])
    np.testing.assert_array_equal(out.tokens[1, length:], 0)
    np.testing.assert_array_equal(out.model_logprobs[1, length:], 0.0)


def _stop_rule_numpy(probs, tokens, stop_tokens, after, threshold):
    """Per-row NumPy simulation: (length, reason) with M1's consecutive-confident-token truncation."""
    run = 0
    for i, (p, t) in enumerate(zip(probs, tokens)):
        run = run + 1 if p > threshold else 0
        if t in stop_tokens:
            return i + 1, gen.STOP_TOKEN
        if after > 0 and run >= after:
            return i + 1, gen.TRUNCATED
    return len(tokens), gen.MAX_LENGTH


def _run_stop_rules(stop, probs, tokens):
    """(lengths [B], stop reasons [B]) of ``update_stop_state`` stepped over [B, N] tokens and their probabilities."""
    b, n = tokens.shape
    step = jax.jit(gen.update_stop_state)
    done, run, reason = jnp.zeros(b, bool), jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32)
    lengths = np.zeros(b, int)
    for i in range(n):
        lengths += ~np.asarray(done)
        done, run, reason = step(stop, jnp.asarray(tokens[:, i], jnp.int32),
                                 jnp.log(jnp.asarray(probs[:, i], jnp.float32)), done, run, reason)
    return lengths, np.asarray(reason)


def test_truncation_rule_against_numpy():
    rng = np.random.default_rng(0)
    b, n = 64, 40
    probs = np.where(rng.random((b, n)) < 0.85, rng.uniform(0.995, 1.0, (b, n)), rng.uniform(0.2, 0.99, (b, n)))
    tokens = rng.integers(0, 50, (b, n))
    lengths, reason = _run_stop_rules(gen.StopRules.make([3, 17], truncate_after=5, truncate_prob=0.99), probs, tokens)
    want = [_stop_rule_numpy(probs[r], tokens[r], (3, 17), 5, 0.99) for r in range(b)]
    np.testing.assert_array_equal(lengths, [w[0] for w in want])
    np.testing.assert_array_equal(reason, [w[1] for w in want])
    assert {w[1] for w in want} == {gen.MAX_LENGTH, gen.STOP_TOKEN, gen.TRUNCATED}  # every branch exercised


def test_truncation_in_the_decode_loop(split, prompts):
    # threshold 0: every token counts as confident, so every row is cut after exactly 3 tokens
    out = _greedy(split, prompts, stop=gen.StopRules.make(truncate_after=3, truncate_prob=0.0))
    np.testing.assert_array_equal(out.lengths, 3)
    np.testing.assert_array_equal(out.stop_reason, gen.TRUNCATED)
    np.testing.assert_array_equal(out.tokens[:, 3:], 0)


def _filter_numpy(logits, temperature, top_k, top_p):
    """Reference: logits / T, keep the top_k largest, then the smallest set with mass >= top_p (by sorting)."""
    out = np.full_like(logits, -np.inf, dtype=np.float64)
    for r, row in enumerate(logits.astype(np.float64) / temperature):
        order = np.argsort(-row, kind="stable")
        kept = order[:top_k] if top_k > 0 else order
        p = np.exp(row[kept] - row[kept].max())
        p /= p.sum()
        mass_before = np.cumsum(p) - p
        kept = kept[(mass_before < top_p) | (np.arange(len(kept)) == 0)]
        out[r, kept] = row[kept]
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.9),
                                                     (1.0, 1, 0.5), (2.0, 0, 0.05)])
def test_sampling_filters_against_numpy(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(0, 2, (4, 64)).astype(np.float32)
    sampling = gen.Sampling.make(temperature, top_k, top_p)
    got = np.asarray(jax.jit(gen.filter_logits)(jnp.asarray(logits), sampling))
    want = _filter_numpy(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_samples_follow_the_filtered_distribution():
    logits = np.random.default_rng(2).normal(0, 1.5, (1, 16)).astype(np.float32)
    sampling = gen.Sampling.make(0.8, 10, 0.9)
    n = 20000
    tokens, logp, model_logp, max_prob = jax.jit(gen.sample_tokens)(
        jax.random.key(0), jnp.asarray(np.repeat(logits, n, 0)), sampling)
    want = _filter_numpy(logits, 0.8, 10, 0.9)[0]
    p = np.exp(want - np.max(want))
    p /= p.sum()
    freq = np.bincount(np.asarray(tokens), minlength=16) / n
    assert np.all(freq[p == 0] == 0)
    assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)  # 4 sigma
    np.testing.assert_allclose(np.asarray(logp), np.log(p[np.asarray(tokens)]), atol=1e-5)
    raw = logits[0] - np.log(np.sum(np.exp(logits[0].astype(np.float64))))
    np.testing.assert_allclose(np.asarray(model_logp), raw[np.asarray(tokens)], atol=1e-5)
    np.testing.assert_allclose(np.asarray(max_prob), np.exp(raw.max()), atol=1e-6)


def test_temperature_to_zero_equals_greedy():
    logits = jnp.asarray(np.random.default_rng(3).normal(0, 1, (8, 64)), jnp.float32)
    cold = gen.sample_tokens(jax.random.key(1), logits, gen.Sampling.make(1e-4))[0]
    greedy = gen.sample_tokens(jax.random.key(1), logits, gen.Sampling.greedy())[0]
    np.testing.assert_array_equal(cold, jnp.argmax(logits, -1))
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))


def test_no_recompilation_for_same_bucketed_sizes(split, prompts, greedy_batch):
    rng = np.random.default_rng(11)
    other = [rng.integers(1, CFG.vocab_size, n).tolist() for n in (10, 15, 12)]  # same bucket as PROMPT_LENGTHS
    before = dict(gen.TRACE_COUNTS)
    for sampling, stop in ((gen.Sampling.make(0.9, 7, 0.95), gen.StopRules.make([5, 6], truncate_after=4)),
                           (gen.Sampling.make(1.2), gen.StopRules.make(truncate_after=0)),
                           (gen.Sampling.greedy(), gen.StopRules.make([1]))):
        out = gen.generate(split, other, max_new_tokens=NEW, sampling=sampling, stop=stop, chunk_size=CHUNK,
                           kv_dtype="float32", key=jax.random.key(5))
        assert out.tokens.shape == (3, NEW)
    assert dict(gen.TRACE_COUNTS) == before


def test_bucket_length():
    assert [gen.bucket_length(n, 64) for n in (1, 16, 17, 33, 64, 65, 128, 129)] == [16, 16, 32, 64, 64, 128, 128, 192]
    with pytest.raises(ValueError):
        gen.bucket_length(0, 64)


def test_per_row_stop_rules_against_numpy():
    """Rows with their own stop tokens and truncation settings in one batch (the serving engine's batches) against
    the per-row NumPy simulation; every stop reason occurs."""
    rng = np.random.default_rng(3)
    b, n = 6, 30
    probs = np.where(rng.random((b, n)) < 0.8, rng.uniform(0.995, 1.0, (b, n)), rng.uniform(0.2, 0.99, (b, n)))
    tokens = rng.integers(0, 20, (b, n))
    rules = [((3,), 4, 0.99), ((), 2, 0.99), ((5, 6), 0, 0.99), ((), 3, 0.5), ((1,), 6, 0.999), ((), 0, 0.99)]
    lengths, reason = _run_stop_rules(gen.StopRules.rows(*zip(*rules), slots=4), probs, tokens)
    want = [_stop_rule_numpy(probs[r], tokens[r], stops, after, threshold)
            for r, (stops, after, threshold) in enumerate(rules)]
    np.testing.assert_array_equal(lengths, [w[0] for w in want])
    np.testing.assert_array_equal(reason, [w[1] for w in want])
    assert {w[1] for w in want} == {gen.MAX_LENGTH, gen.STOP_TOKEN, gen.TRUNCATED}  # every branch exercised


def test_bf16_model_with_the_default_bf16_cache_follows_its_uncached_forward():
    """The production setting: bf16 compute and the cache in its default dtype (bf16), which every other test here
    sets to fp32. Chunked prefill, then decode one position at a time, against the same bf16 model's uncached
    forward (``BF16_TOL``)."""
    model = init_model(CFG.replace(compute_dtype="bfloat16"), seed=3)
    bf16 = nnx.split(model)
    tokens = np.random.default_rng(11).integers(1, CFG.vocab_size, 29).tolist()
    full = _full_logits(bf16, [tokens])[0]
    prompt_len = 20
    bucket = gen.bucket_length(prompt_len, CHUNK)
    padded, start = gen.left_pad([tokens[:prompt_len]], bucket)
    cache = HybridCache.init(CFG, 1, bucket + len(tokens) - prompt_len, start=jnp.asarray(start))
    assert {str(e[name].dtype) for e in cache.layers for name in ("k", "v") if name in e} == {"bfloat16"}
    logits, cache = gen.prefill(*bf16, padded, cache, CHUNK)
    got = [np.asarray(logits[0], np.float32)]
    for t in tokens[prompt_len:]:
        logits, cache = gen._prefill_chunk_jit(*bf16, jnp.asarray([[t]], jnp.int32), cache)
        got.append(np.asarray(logits[0], np.float32))
    np.testing.assert_allclose(np.stack(got), full[prompt_len - 1:], rtol=0, atol=BF16_TOL)
    assert float(np.std(full)) > 0.3
