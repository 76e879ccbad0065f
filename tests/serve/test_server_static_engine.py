"""The static-batching engine (the server's test engine) against m1jax.generate: batching by sampling settings,
stop rules, cancellation of queued and running requests, stop(), refused requests."""
import threading
import time

import jax
import numpy as np
import pytest

from m1jax import generate as gen
from m1jax.model import init_model
from m1jax.serve.static import StaticEngine
from m1jax.serve.types import SamplingParams
from tests.serve import server_harness as h


class RecordingEngine(StaticEngine):
    """Records each batch's request ids; runs no batch until ``gate`` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.batches: list[list[str]] = []

    def _run(self, batch):
        self.batches.append([r.request_id for r in batch])
        self.gate.wait()
        super()._run(batch)


@pytest.fixture(scope="module")
def model():
    return init_model(h.tiny_config(), 4)


@pytest.fixture
def engine(model):
    engine = RecordingEngine(model, h.engine_config())
    yield engine
    engine.gate.set()
    engine.stop()


GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def test_batches_group_sampling_settings_and_equal_each_request_alone(engine):
    prompts = {"g1": [1, 2, 3], "g2": [9] * 16, "g3": [4, 5], "t1": [6, 7], "t2": [8], "s1": [6, 7], "g4": [30]}
    params = {"g1": GREEDY, "g2": SamplingParams(max_tokens=16, temperature=0.0), "g3": GREEDY,
              "t1": SamplingParams(max_tokens=5, temperature=0.7), "t2": SamplingParams(max_tokens=5, temperature=0.7),
              "s1": SamplingParams(max_tokens=5, temperature=0.7, seed=11), "g4": GREEDY}
    handles = {rid: engine.submit(prompts[rid], params[rid], rid) for rid in prompts}  # queued: not started yet
    engine.gate.set()
    engine.start()
    results = {rid: handle.result() for rid, handle in handles.items()}
    # oldest first; one batch per setting, at most 4 rows; a seeded sampled request alone
    assert engine.batches == [["g1", "g2", "g3", "g4"], ["t1", "t2"], ["s1"]]
    for rid in ("g1", "g2", "g3", "g4"):
        tokens, logprobs = h.greedy(engine.split, prompts[rid], params[rid].max_tokens)
        assert list(results[rid].token_ids) == tokens
        np.testing.assert_allclose(results[rid].logprobs, logprobs, rtol=0, atol=1e-5)
        assert results[rid].finish_reason == "length" and results[rid].prompt_tokens == len(prompts[rid])
    seeded = gen.generate(engine.split, [prompts["s1"]] + [[0]] * (h.BATCH - 1), max_new_tokens=h.DECODE,
                          key=jax.random.key(11), sampling=gen.Sampling.make(0.7),
                          stop=gen.StopRules.make(truncate_after=0), chunk_size=h.CHUNK, kv_dtype="float32")
    assert list(results["s1"].token_ids) == np.asarray(seeded.tokens[0, :5]).tolist()
    stats = h.wait_idle(engine)
    assert stats["finished_requests"] == stats["submitted_requests"] == 7
    assert stats["generated_tokens"] == 6 * 3 + 16 + 5 * 3 and len(stats["ttft_s"]) == 7


def test_stop_tokens_end_a_request(engine):
    free, _ = h.greedy(engine.split, [3, 1, 4], 10)
    stop = free[2]
    engine.gate.set()
    engine.start()
    done = engine.submit([3, 1, 4], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop,))).result()
    assert list(done.token_ids) == free[:free.index(stop) + 1] and done.finish_reason == "stop"
    cut = engine.submit([3, 1, 4], SamplingParams(max_tokens=free.index(stop), temperature=0.0,
                                                  stop_token_ids=(stop,))).result()
    assert list(cut.token_ids) == free[:free.index(stop)] and cut.finish_reason == "length"


def test_cancel_a_queued_request(engine):
    handle = engine.submit([1, 2], GREEDY, "queued")
    assert engine.stats()["queued"] == 1
    engine.cancel("queued")
    done = handle.result()
    assert done.token_ids == () and done.finish_reason == "cancelled"
    stats = engine.stats()
    assert stats["queued"] == 0 and stats["cancelled_requests"] == 1


def test_cancel_a_running_request_ends_its_stream_at_once(engine):
    handle = engine.submit([1, 2], GREEDY, "running")
    other = engine.submit([5, 6], GREEDY, "other")
    engine.start()
    deadline = time.monotonic() + 30
    while engine.stats()["running"] < 2:  # both in the batch held by the gate
        assert time.monotonic() < deadline
        time.sleep(0.01)
    engine.cancel("running")
    done = handle.result()  # returns before the batch runs
    assert done.token_ids == () and done.finish_reason == "cancelled"
    engine.gate.set()
    assert list(other.result().token_ids) == h.greedy(engine.split, [5, 6], 6)[0]
    stats = h.wait_idle(engine)
    assert handle._queue.empty()  # the discarded tokens never reached the stream
    assert stats["cancelled_requests"] == 1 and stats["finished_requests"] == 1
    assert stats["generated_tokens"] == 6


def test_stop_cancels_what_is_left(engine):
    handles = [engine.submit([i + 1], GREEDY) for i in range(3)]
    engine.stop()
    assert [h_.result().finish_reason for h_ in handles] == ["cancelled"] * 3
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit([1], GREEDY)


@pytest.mark.parametrize("prompt,params,message", [
    ([1, 64], GREEDY, "vocab_size=64"),
    ([-1], GREEDY, "vocab_size=64"),
    ([], GREEDY, "non-empty"),
    ([1.5, 2.0], GREEDY, "integer token ids"),
    ([1] * 120, SamplingParams(max_tokens=9), "max_position_embeddings=128"),
    ([1], SamplingParams(stop_token_ids=tuple(range(9))), "at most 8 stop token ids"),
    ([1], SamplingParams(stop_token_ids=(64,)), "not in the vocabulary"),
])
def test_submit_refuses_what_the_model_cannot_take(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, params)
    assert engine.stats()["submitted_requests"] == 0


def test_request_ids_are_unique(engine):
    engine.submit([1], GREEDY, "same")
    with pytest.raises(ValueError, match="already in use"):
        engine.submit([2], GREEDY, "same")
