"""The continuous engine against m1jax.generate and the uncached forward: staggered arrivals, sampling, stop rules,
cancellation, request checks, the engine thread, and no recompilation once every bucket is compiled."""
import asyncio

import jax
import numpy as np
import pytest
from flax import nnx

from m1jax import generate as gen
from m1jax.model import init_model
from m1jax.serve import programs
from m1jax.serve.types import RequestHandle, SamplingParams, TokenEvent
from tests.serve.conftest import (CFG, REFERENCE_NEW, TOL, full_logits, generate_greedy, make_engine,
                                  model_logprobs, random_prompts)

GREEDY = SamplingParams(max_tokens=REFERENCE_NEW, temperature=0.0)


def test_greedy_outputs_equal_generate_for_requests_joining_at_different_steps(split):
    prompts = random_prompts(0, (5, 19, 30))
    engine = make_engine(split)
    handles = [engine.submit(prompts[0], GREEDY)]
    engine.step()
    engine.step()  # request 0 is decoding when request 1 arrives; request 2 arrives while 1 is prefilling
    handles.append(engine.submit(prompts[1], GREEDY))
    engine.step()
    handles.append(engine.submit(prompts[2], GREEDY))
    engine.run_until_idle()
    for handle, (tokens, logprobs, _) in zip(handles, generate_greedy(split, prompts)):
        result = handle.result()
        assert list(result.token_ids) == tokens and result.finish_reason == "length"
        np.testing.assert_allclose(result.logprobs, logprobs, rtol=0, atol=TOL)
    stats = engine.stats()
    assert stats["generated_tokens"] == 3 * REFERENCE_NEW and stats["prefilled_tokens"] == 54
    assert stats["free_slots"] == 4 and stats["running"] == 0


def test_sampled_outputs_depend_only_on_the_seed(split):
    prompts = random_prompts(1, (12, 7, 25))
    sampled = SamplingParams(max_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=11)
    alone = make_engine(split)
    first = alone.submit(prompts[0], sampled)
    alone.run_until_idle()
    first = first.result()

    busy = make_engine(split)  # the same request batched with others, arriving later, in another slot
    others = [busy.submit(p, SamplingParams(max_tokens=6, temperature=1.0, seed=5)) for p in prompts[1:]]
    busy.step()
    again = busy.submit(prompts[0], sampled)
    reseeded = busy.submit(prompts[0], sampled.replace(seed=12))
    busy.run_until_idle()
    results = [h.result() for h in [again, reseeded] + others]  # result() drains a stream: once per handle
    assert results[0].token_ids == first.token_ids
    assert results[1].token_ids != first.token_ids
    for result, prompt in zip(results, [prompts[0], prompts[0]] + prompts[1:]):
        np.testing.assert_allclose(result.logprobs, model_logprobs(split, prompt, result.token_ids), rtol=0,
                                   atol=TOL)


def test_stop_tokens_truncation_and_max_tokens(split):
    prompts = random_prompts(2, (9, 14, 21))
    reference = generate_greedy(split, prompts)
    stops = (reference[0][0][3], 3)
    first = min(i for i, t in enumerate(reference[0][0]) if t in stops) + 1
    engine = make_engine(split)
    stop = engine.submit(prompts[0], GREEDY.replace(stop_token_ids=stops))
    truncated = engine.submit(prompts[1], GREEDY.replace(truncate_after=3, truncate_prob=0.0))
    short = engine.submit(prompts[2], GREEDY.replace(max_tokens=2))
    single = engine.submit(prompts[2], GREEDY.replace(max_tokens=1))
    engine.run_until_idle()

    with_stop = generate_greedy(split, prompts[:1], stop_tokens=list(stops))[0]
    result = stop.result()
    assert result.finish_reason == "stop" and len(result.token_ids) == first
    assert list(result.token_ids) == with_stop[0] and with_stop[2] == gen.STOP_TOKEN
    result = truncated.result()  # probability threshold 0: every token is confident, cut after 3
    assert result.finish_reason == "truncated" and list(result.token_ids) == reference[1][0][:3]
    for handle, n in ((short, 2), (single, 1)):
        result = handle.result()
        assert result.finish_reason == "length" and list(result.token_ids) == reference[2][0][:n]
    assert engine.stats()["free_pages"] == engine.pages.num_pages - 1 - engine.prefix_cache.num_pages


def test_cancel_frees_slot_and_pages_at_once_and_others_are_unaffected(split):
    prompts = random_prompts(3, (10, 17, 6))
    engine = make_engine(split, prefix_cache_bytes=0)
    handles = [engine.submit(p, GREEDY) for p in prompts]
    extra = [engine.submit(prompts[2], GREEDY) for _ in range(2)]  # the second of these waits: 4 slots
    for _ in range(4):
        engine.step()
    assert engine.stats()["running"] == 4 and engine.stats()["queued"] == 1
    victim = engine._active[handles[1].request_id]
    assert victim.next_token is not None  # decoding
    slots, pages, held = engine.stats()["free_slots"], engine.stats()["free_pages"], len(victim.pages)
    engine.cancel(handles[1].request_id)
    assert engine.stats()["free_slots"] == slots + 1 and engine.stats()["free_pages"] == pages + held
    events = list(handles[1])
    assert events[-1].finish_reason == "cancelled" and events[-1].token_id is None
    engine.cancel(extra[1].request_id)  # queued: never admitted
    assert list(extra[1])[-1].finish_reason == "cancelled" and engine.stats()["queued"] == 0
    engine.run_until_idle()
    reference = generate_greedy(split, prompts)
    for i in (0, 2):
        assert list(handles[i].result().token_ids) == reference[i][0]
    assert list(extra[0].result().token_ids) == reference[2][0]
    assert engine.stats()["free_slots"] == 4 and engine.stats()["free_pages"] == engine.pages.num_pages - 1


@pytest.mark.parametrize("prompt, params, message", [
    ([1, 2, CFG.vocab_size], GREEDY, r"token ids must be in \[0, vocab_size=256\); got min 1, max 256"),
    ([3, -1], GREEDY, "got min -1"),
    ([], GREEDY, "non-empty"),
    ([1.5, 2.0], GREEDY, "non-integer"),
    ([1] * 60, GREEDY, "60 tokens \\+ max_tokens 8 = 68 exceeds the engine's context of 64 tokens"),
    ([1, 2], GREEDY.replace(stop_token_ids=tuple(range(9))), "at most 8 stop tokens"),
    ([1, 2], GREEDY.replace(stop_token_ids=(5, 300)), r"stop tokens \[300\] are not in the vocabulary"),
])
def test_requests_are_checked_before_queueing(split, prompt, params, message):
    engine = make_engine(split)
    before = dict(programs.TRACE_COUNTS)
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, params)
    assert engine.stats()["queued"] == 0 and not engine.step()
    assert dict(programs.TRACE_COUNTS) == before


def test_engine_thread_streams_to_threads_and_asyncio(split):
    prompts = random_prompts(4, (8, 13))
    reference = generate_greedy(split, prompts)
    engine = make_engine(split)
    engine.start()
    try:
        handles = [engine.submit(p, GREEDY) for p in prompts]
        tokens = [e.token_id for e in handles[0]]

        async def consume():
            return [e.token_id async for e in handles[1].stream()]

        streamed = asyncio.run(consume())
    finally:
        engine.stop()
    assert tokens == reference[0][0] and streamed == reference[1][0]
    assert handles[0].time_to_first_token_s > 0 and len(engine.stats()["itl_s"]) == 2 * (REFERENCE_NEW - 1)


def test_a_failed_step_ends_its_requests_with_an_error_and_the_engine_recovers(split, monkeypatch):
    prompts = random_prompts(6, (9, 15))
    engine = make_engine(split)
    decode = engine.device.decode

    def fail_once(*args):
        monkeypatch.setattr(engine.device, "decode", decode)
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.device, "decode", fail_once)
    engine.start()
    try:
        failed = engine.submit(prompts[0], GREEDY).result()
        assert failed.finish_reason == "error" and len(failed.token_ids) == 1  # the first token came from prefill
        assert engine.stats()["free_slots"] == 4 and engine.stats()["free_pages"] == engine.pages.num_pages - 1
        after = engine.submit(prompts[1], GREEDY).result()
    finally:
        engine.stop()
    assert list(after.token_ids) == generate_greedy(split, prompts[1:])[0][0]


def test_no_recompilation_once_every_bucket_is_compiled(split):
    """Several buckets of each kind (rows 1/2/4, chunks 4/8, contexts of 8/16 pages); after ``warmup`` a workload
    of mixed lengths, arrivals and sampling settings traces nothing, and every request's log-probs are the uncached
    forward's (greedy ones: its argmax tokens), so no bucket's padding or page-table width loses context (prompts
    and outputs reach 58 tokens, past the 8-page width of 32)."""
    engine = make_engine(split, min_decode_rows=1, min_chunk=4, min_context_bucket=32)
    assert engine.device.buckets() == {"rows": [1, 2, 4], "chunks": [4, 8], "widths": [8, 16],
                                       "decode_widths": [8, 16]}
    engine.warmup()
    before = dict(programs.TRACE_COUNTS)
    rng = np.random.default_rng(5)
    submitted = []  # (prompt, temperature, handle)
    for wave in range(3):
        for length in rng.integers(1, 40, size=int(rng.integers(1, 4))):
            prompt = rng.integers(0, CFG.vocab_size, int(length)).tolist()
            temperature = float(wave) / 2
            submitted.append((prompt, temperature, engine.submit(prompt, SamplingParams(
                max_tokens=int(rng.integers(1, 20)), temperature=temperature, top_k=int(rng.integers(0, 5)),
                seed=int(rng.integers(0, 100))))))
        for _ in range(int(rng.integers(1, 6))):
            engine.step()
    engine.run_until_idle()
    assert dict(programs.TRACE_COUNTS) == before
    results = [(prompt, temperature, handle.result()) for prompt, temperature, handle in submitted]
    assert sum(len(r.token_ids) for _, _, r in results) == engine.stats()["generated_tokens"] > 20
    assert max(len(p) + len(r.token_ids) for p, _, r in results) > 32  # some request outgrew the 8-page width
    for prompt, temperature, result in results:
        tokens = list(result.token_ids)
        np.testing.assert_allclose(result.logprobs, model_logprobs(split, prompt, tokens), rtol=0, atol=TOL)
        if temperature == 0:
            logits = full_logits(split, prompt + tokens)[len(prompt) - 1:-1]
            assert tokens == np.argmax(logits, axis=-1).tolist()


def test_a_stream_left_on_a_closed_event_loop_does_not_fail_the_engine_side():
    """A server that shut down mid-stream leaves its reader suspended on a closed event loop: the engine's next event
    for that request must still go through (it used to raise "Event loop is closed" in the engine thread), and a
    stream that ends stops listening."""
    handle = RequestHandle("r", 3)
    loop = asyncio.new_event_loop()
    stream = handle.stream()
    handle.put(TokenEvent("r", 7, -0.5))
    assert loop.run_until_complete(stream.__anext__()).token_id == 7  # the reader now waits on this loop
    loop.close()
    handle.put(TokenEvent("r", 8, -0.25, finish_reason="length"))
    assert [e.token_id for e in handle] == [8]

    done = RequestHandle("s", 1)
    done.put(TokenEvent("s", 1, 0.0, finish_reason="stop"))
    assert asyncio.run(_drain(done)) == [1] and not done._listeners


async def _drain(handle):
    return [e.token_id async for e in handle.stream()]


# bf16 compute, engine against the uncached forward of the same bf16 model: see tests/generate's BF16_TOL.
BF16_TOL = 5e-2


def test_bf16_model_with_the_default_cache_dtype_follows_its_uncached_forward():
    """The production setting that every other engine test leaves out: bf16 compute and the page pools in their
    default dtype (the compute dtype). Two greedy requests of different lengths, batched: each token's log-prob is
    the uncached forward's, and each token is that forward's most likely one (up to the bf16 tolerance)."""
    bf16 = nnx.split(init_model(CFG.replace(compute_dtype="bfloat16"), seed=3))
    engine = make_engine(bf16, kv_dtype=None)
    prompts = random_prompts(3, (11, 30))
    handles = [engine.submit(p, GREEDY) for p in prompts]
    engine.run_until_idle()
    assert {str(e[name].dtype) for e in engine.device.pools for name in ("k", "v") if name in e} == {"bfloat16"}
    for prompt, handle in zip(prompts, handles):
        result = handle.result()  # drains the handle's stream: once
        tokens = list(result.token_ids)
        assert len(tokens) == REFERENCE_NEW
        np.testing.assert_allclose(result.logprobs, model_logprobs(bf16, prompt, tokens), rtol=0, atol=BF16_TOL)
        logits = full_logits(bf16, prompt + tokens)[len(prompt) - 1:-1]
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        assert np.all(logp[np.arange(len(tokens)), tokens] >= logp.max(-1) - 2 * BF16_TOL)
