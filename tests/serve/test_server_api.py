"""The OpenAI-compatible server through the official ``openai`` client and raw HTTP, against m1jax.generate.

Two servers over one tiny model (so they share its compiled programs): one with a word-level tokenizer and
MiniMax-M1's chat template (an HF checkpoint directory), one without a tokenizer (token-id text).
"""
import dataclasses
import json
import queue
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import openai  # in the test extra: a missing client must fail the suite, not skip it
import pytest

from m1jax import generate as gen
from m1jax.serve.loading import load_served_model
from m1jax.serve.text import TokenIdText
from tests.serve import server_harness as h



@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return load_served_model(hf_checkpoint=h.write_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=1))


@pytest.fixture(scope="module")
def text_server(source):
    with h.serving(source, "tiny-m1") as served:
        yield served


@pytest.fixture(scope="module")
def ids_server(source):
    with h.serving(dataclasses.replace(source, text=TokenIdText()), "tiny-ids") as served:
        yield served


@pytest.fixture(scope="module")
def split(text_server):
    return text_server[1].split


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="none", max_retries=0, timeout=300)


def post(server, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server[0].url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def words(ids):
    return " ".join(h.WORDS[i] for i in ids if i >= len(h.SPECIALS))


# ------------------------------------------------------------------------------------------------ completions
def test_completions_of_token_ids_equal_generate(ids_server, split):
    prompts = [[5, 9, 13, 2], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55], [7]]
    out = client(ids_server).completions.create(model="tiny-ids", prompt=prompts, max_tokens=9, temperature=0,
                                                logprobs=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, out.choices):
        tokens, logprobs = h.greedy(split, prompt, 9)
        assert choice.text == " ".join(map(str, tokens))  # as experiments.generate prints them
        assert choice.finish_reason == "length"
        assert choice.logprobs.tokens == [str(t) for t in tokens]
        np.testing.assert_allclose(choice.logprobs.token_logprobs, logprobs, rtol=0, atol=1e-5)
    assert out.usage.prompt_tokens == sum(map(len, prompts)) and out.usage.completion_tokens == 27


def test_text_prompt_without_tokenizer_is_token_ids(ids_server, split):
    out = client(ids_server).completions.create(model="tiny-ids", prompt=" 3 14  15\n9 ", max_tokens=4,
                                                temperature=0)
    assert out.choices[0].text == " ".join(map(str, h.greedy(split, [3, 14, 15, 9], 4)[0]))


def test_completion_text_with_tokenizer(text_server, split):
    prompt = "w1 w2 w3 w4 w5"
    ids = [h.WORDS.index(w) for w in prompt.split()]
    out = client(text_server).completions.create(model="tiny-m1", prompt=prompt, max_tokens=12, temperature=0,
                                                 extra_body={"return_token_ids": True})
    choice = out.choices[0]
    tokens, _ = h.greedy(split, ids, 12, stop_ids=[h.EOS_ID])  # the tokenizer's eos stops generation
    assert choice.model_extra["prompt_token_ids"] == ids
    assert choice.model_extra["token_ids"] == tokens
    assert choice.text == words(tokens)
    assert choice.finish_reason == ("stop" if tokens[-1] == h.EOS_ID else "length")


def test_ignore_eos_and_stop_token_ids(text_server, split):
    ids = [20, 21, 22]
    free, _ = h.greedy(split, ids, 12)
    out = client(text_server).completions.create(model="tiny-m1", prompt=ids, max_tokens=12, temperature=0,
                                                 extra_body={"ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == free
    stop = free[3]
    out = client(text_server).completions.create(
        model="tiny-m1", prompt=ids, max_tokens=12, temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [stop], "return_token_ids": True})
    assert out.choices[0].model_extra["token_ids"] == free[:free.index(stop) + 1]
    assert out.choices[0].finish_reason == "stop"


def test_stop_strings_cut_the_text(text_server, split):
    ids = [30, 31, 32, 33]
    free, _ = h.greedy(split, ids, 12)
    stop_word = h.WORDS[next(t for t in free[2:] if t >= len(h.SPECIALS))]  # a word generated third or later
    full = words(free)
    expected = full[:full.find(stop_word)]  # the text before the stop string's first occurrence
    assert expected
    kw = dict(model="tiny-m1", prompt=ids, max_tokens=12, temperature=0, stop=[stop_word, "never"],
              extra_body={"ignore_eos": True})
    out = client(text_server).completions.create(**kw)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client(text_server).completions.create(stream=True, **kw))
    assert streamed == out.choices[0].text


def test_seeded_sampling_equals_generate_with_that_seed(ids_server, split):
    kw = dict(model="tiny-ids", prompt=[8, 6, 4], max_tokens=10, temperature=0.9, top_p=0.95, seed=1234,
              extra_body={"top_k": 20})
    first = client(ids_server).completions.create(**kw).choices[0].text
    second = client(ids_server).completions.create(**kw).choices[0].text
    out = gen.generate(split, [[8, 6, 4]] + [[0]] * (h.BATCH - 1), max_new_tokens=h.DECODE, key=jax.random.key(1234),
                       sampling=gen.Sampling.make(0.9, 20, 0.95), stop=gen.StopRules.make(truncate_after=0),
                       chunk_size=h.CHUNK, kv_dtype="float32")
    expected = " ".join(map(str, np.asarray(out.tokens[0, :10]).tolist()))
    assert first == second == expected
    assert expected != " ".join(map(str, h.greedy(split, [8, 6, 4], 10)[0]))  # it did sample


def test_streamed_completion_equals_the_whole(ids_server):
    kw = dict(model="tiny-ids", prompt=[[1, 2, 3], [4, 5]], max_tokens=7, temperature=0)
    whole = client(ids_server).completions.create(**kw)
    chunks = list(client(ids_server).completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for i in range(2):
        pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(p.text for p in pieces) == whole.choices[i].text
        assert [p.finish_reason for p in pieces][-1] == "length" and pieces[0].finish_reason is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14


# ------------------------------------------------------------------------------------------------ chat
MESSAGES = [{"role": "system", "content": "w7"},
            {"role": "user", "content": [{"type": "text", "text": "w1 w2"}]}]
# MiniMax-M1's template: <begin_of_document> <beginning_of_sentence>system ai_setting=assistant\nw7<end_of_sentence>\n
# <beginning_of_sentence>user name=user\nw1 w2<end_of_sentence>\n<beginning_of_sentence>ai name=assistant\n
CHAT_IDS = [1, 2, 8, 9, 10 + 7, 3, 2, 4, 5, 10 + 1, 10 + 2, 3, 2, 6, 7]


def test_chat_renders_m1_template_and_equals_generate(text_server, split):
    out = client(text_server).chat.completions.create(model="tiny-m1", messages=MESSAGES, max_tokens=10,
                                                      temperature=0, logprobs=True,
                                                      extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert choice.model_extra["prompt_token_ids"] == CHAT_IDS
    tokens, logprobs = h.greedy(split, CHAT_IDS, 10, stop_ids=[h.EOS_ID])
    assert choice.model_extra["token_ids"] == tokens
    assert choice.message.role == "assistant" and choice.message.content == words(tokens)
    np.testing.assert_allclose([c.logprob for c in choice.logprobs.content], logprobs, rtol=0, atol=1e-5)
    assert out.usage.prompt_tokens == len(CHAT_IDS)


def test_chat_streaming_equals_the_whole(text_server):
    kw = dict(model="tiny-m1", messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client(text_server).chat.completions.create(**kw).choices[0]
    chunks = list(client(text_server).chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "length"


def test_chat_default_max_tokens_is_the_rest_of_the_context(text_server, split):
    # with ignore_eos the model runs until the context is full
    _, body = post(text_server, "/v1/chat/completions",
                   {"messages": MESSAGES, "temperature": 0, "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == h.MAX_POSITIONS - len(CHAT_IDS)
    assert body["choices"][0]["finish_reason"] == "length"


# ------------------------------------------------------------------------------------------------ errors
BAD = [  # (server, path, body, status, message fragment)
    ("ids", "/v1/completions", b'{"prompt": [1, 2', 400, "not valid JSON"),
    ("ids", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("ids", "/v1/completions", {"prompt": [1], "frobnicate": 1}, 400, "Unrecognized request argument supplied: "
                                                                       "frobnicate"),
    ("ids", "/v1/completions", {"max_tokens": 3}, 400, "missing required field: prompt"),
    ("ids", "/v1/completions", {"prompt": [1, 64]}, 400, "out of the vocabulary"),
    ("ids", "/v1/completions", {"prompt": [[1], [-1]]}, 400, "out of the vocabulary"),
    ("ids", "/v1/completions", {"prompt": [1, 2], "max_tokens": 127}, 400, "maximum context length is 128"),
    ("ids", "/v1/completions", {"prompt": [1], "max_tokens": 0}, 400, "max_tokens must be >= 1"),
    ("ids", "/v1/completions", {"prompt": [1], "temperature": -0.5}, 400, "temperature must be >= 0"),
    ("ids", "/v1/completions", {"prompt": [1], "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("ids", "/v1/completions", {"prompt": [1], "max_tokens": "3"}, 400, "max_tokens"),
    ("ids", "/v1/completions", {"prompt": "hello world"}, 400, "whitespace-separated token ids"),
    ("ids", "/v1/completions", {"prompt": "1 2", "stop": "x"}, 400, "stop strings need a tokenizer"),
    ("ids", "/v1/completions", {"prompt": [1], "stop_token_ids": [99]}, 400, "out of the vocabulary"),
    ("ids", "/v1/completions", {"prompt": [], "max_tokens": 1}, 400, "must not be empty"),
    ("ids", "/v1/completions", {"prompt": [1], "n": 2}, 400, "n=2 is not supported"),
    ("ids", "/v1/completions", {"prompt": [1], "logprobs": 3}, 400, "logprobs=3"),
    ("ids", "/v1/completions", {"prompt": [1], "echo": True}, 400, "echo"),
    ("ids", "/v1/completions", {"prompt": [1], "model": "gpt-4"}, 404, "The model `gpt-4` does not exist"),
    ("ids", "/v1/chat/completions", {"messages": [{"role": "user", "content": "1"}]}, 400, "no chat template"),
    ("text", "/v1/chat/completions", {"messages": []}, 400, "messages must not be empty"),
    ("text", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "w1"}]}, 400, "role must be"),
    ("text", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "text part"),
    ("text", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 200}, 400, "maximum context length"),
    ("text", "/v1/completions", {"prompt": "w1", "stop_token_ids": list(range(9)), "max_tokens": 2}, 400,
     "at most 8 stop token"),
    ("text", "/v1/nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("which,path,body,status,fragment", BAD, ids=[f"{b[2]!s:.50}" for b in BAD])
def test_invalid_requests_get_4xx_with_message(text_server, ids_server, which, path, body, status, fragment):
    got_status, answer = post(text_server if which == "text" else ids_server, path, body)
    assert got_status == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert fragment in answer["error"]["message"]


def test_the_client_raises_on_bad_requests(ids_server):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client(ids_server).completions.create(model="tiny-ids", prompt=[1], temperature=-1)


# ------------------------------------------------------------------------------------------------ the rest
def test_models_health_and_metrics(ids_server):
    models = client(ids_server).models.list()
    assert [m.id for m in models.data] == ["tiny-ids"]
    assert post(ids_server, "/health", None)[0] == 405  # GET only
    with urllib.request.urlopen(ids_server[0].url + "/health") as r:
        assert json.load(r)["status"] == "ok"
    client(ids_server).completions.create(model="tiny-ids", prompt=[1, 2], max_tokens=3, temperature=0)
    with urllib.request.urlopen(ids_server[0].url + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    stats = h.wait_idle(ids_server[1])
    assert values["m1jax_queued_requests"] == 0 and values["m1jax_running_requests"] == 0
    assert values["m1jax_generated_tokens_total"] == stats["generated_tokens"] > 0
    assert values["m1jax_prompt_tokens_total"] == stats["prompt_tokens"]
    assert values["m1jax_prefix_cache_hit_rate"] == 0.0
    finished = sum(v for k, v in values.items() if k.startswith("m1jax_requests_total"))
    assert values["m1jax_time_to_first_token_seconds_count"] == finished > 0
    assert values['m1jax_time_to_first_token_seconds_bucket{le="+Inf"}'] == finished
    assert values["m1jax_inter_token_latency_seconds_count"] == values["m1jax_generated_tokens_total"] - finished
    assert 'm1jax_engine_time_to_first_token_seconds{quantile="0.5"}' in values
    assert values['m1jax_http_errors_total{status="405"}'] >= 1


# ------------------------------------------------------------------------------------------------ streaming, stepped
def test_a_stream_sends_tokens_while_its_request_runs_and_closing_it_cancels_the_request(ids_server, split,
                                                                                         monkeypatch):
    """The engine's steps are let through one at a time: a streamed completion's first text arrives while its
    request is still generating (a server that held the answer back until the end fails this), and the whole stream
    is greedy generate's answer. A client that closes its stream mid-answer has its request cancelled after a few
    more steps, far short of its max_tokens."""
    _, engine, _ = ids_server
    h.wait_idle(engine)
    # ``waiting``: the engine is at a step boundary, blocked on ``permits``. A permit goes out only then, so permits
    # never pile up while a step is slow (a loaded machine): one permit, one step.
    permits, waiting, gate_open = threading.Semaphore(0), threading.Semaphore(0), threading.Event()
    step = engine.step

    def one_step_per_permit():
        if not gate_open.is_set():
            waiting.release()
            permits.acquire()
        return step()

    def next_step():
        assert waiting.acquire(timeout=300), "the engine did not come back for its next step"
        permits.release()

    monkeypatch.setattr(engine, "step", one_step_per_permit)

    def stream_into(pieces: queue.Queue, streams: list, **kw):
        stream = client(ids_server).completions.create(model="tiny-ids", stream=True, temperature=0, **kw)
        streams.append(stream)
        try:
            for chunk in stream:
                pieces.put(chunk.choices[0].text if chunk.choices else "")
        except Exception:  # noqa: BLE001  (the second stream is closed under the reader)
            pass
        pieces.put(None)

    def first_text(pieces: queue.Queue) -> str:
        for _ in range(100):  # one engine step at a time, until text arrives
            next_step()
            try:
                text = pieces.get(timeout=0.3)
            except queue.Empty:
                continue
            if text:
                return text
        raise AssertionError("no streamed text after 100 engine steps")

    try:
        before = engine.stats()
        pieces, streams = queue.Queue(), []
        reader = threading.Thread(target=stream_into, args=(pieces, streams),
                                  kwargs=dict(prompt=[3, 1, 4], max_tokens=8))
        reader.start()
        received = [first_text(pieces)]
        now = engine.stats()
        assert now["running"] == 1 and now["finished_requests"] == before["finished_requests"]
        assert now["generated_tokens"] - before["generated_tokens"] < 8
        gate_open.set()
        permits.release()
        reader.join(120)
        while (text := pieces.get(timeout=10)) is not None:
            received.append(text)
        assert "".join(received) == " ".join(map(str, h.greedy(split, [3, 1, 4], 8)[0]))

        h.wait_idle(engine)
        gate_open.clear()
        while waiting.acquire(blocking=False):  # the first request's last visit to the gate
            pass
        before = engine.stats()
        pieces, streams = queue.Queue(), []
        reader = threading.Thread(target=stream_into, args=(pieces, streams),
                                  kwargs=dict(prompt=[2, 7], max_tokens=100))
        reader.start()
        first_text(pieces)
        streams[0].close()
        for _ in range(100):  # step slowly until the server has seen the disconnect and the engine cancelled
            if engine.stats()["cancelled_requests"] > before["cancelled_requests"]:
                break
            next_step()
            time.sleep(0.05)
        gate_open.set()
        permits.release()
        after = h.wait_idle(engine)
        assert after["cancelled_requests"] == before["cancelled_requests"] + 1
        assert after["generated_tokens"] - before["generated_tokens"] < 50
        reader.join(60)
    finally:
        gate_open.set()
        permits.release(10)
