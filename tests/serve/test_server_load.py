"""A bounded load test on localhost: 32 concurrent clients with mixed prompt and output lengths, greedy and seeded
sampling, streaming or not, six of them disconnecting before their answer. Every request is answered (equal to its
single-request answer) or cancelled, the server stays healthy and the engine ends idle with no request unaccounted.

The engine's first batch is held until every request is in the engine and the disconnecting clients are gone, so
their cancellations are certain (a queued request and a running one), not a matter of timing.
"""
import json
import socket
import threading
import time
import urllib.request

import jax
import numpy as np
import openai  # in the test extra: a missing client must fail the suite, not skip it
import pytest

from m1jax import generate as gen
from m1jax.model import init_model
from m1jax.serve.server import ServedModel, create_app
from m1jax.serve.static import StaticEngine
from m1jax.serve.text import TokenIdText
from tests.serve import server_harness as h

CLIENTS = 32


class GatedEngine(StaticEngine):
    """Runs no batch until ``gate`` is set."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def _run(self, batch):
        self.gate.wait()
        super()._run(batch)


def _wait(predicate, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _raw_request(port: int, body: dict) -> socket.socket:
    """A connection that sent a completion request (the caller closes it without reading the answer)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def _seeded_reference(split, prompt, max_tokens, seed, temperature):
    out = gen.generate(split, [prompt] + [[0]] * (h.BATCH - 1), max_new_tokens=h.DECODE, key=jax.random.key(seed),
                       sampling=gen.Sampling.make(temperature), stop=gen.StopRules.make(truncate_after=0),
                       chunk_size=h.CHUNK, kv_dtype="float32")
    return np.asarray(out.tokens[0, :max_tokens]).tolist()


def test_concurrent_clients_with_disconnects():
    cfg = h.tiny_config()
    model = init_model(cfg, 2)
    engine = GatedEngine(model, h.engine_config())
    served = ServedModel("tiny", cfg.vocab_size, cfg.max_position_embeddings, TokenIdText())
    rng = np.random.default_rng(0)
    kinds = ["plain"] * 14 + ["stream"] * 8 + ["seeded"] * 4 + ["drop"] * 3 + ["drop_stream"] * 3
    kinds = [kinds[i] for i in rng.permutation(CLIENTS)]
    specs = [dict(kind=k, prompt=rng.integers(1, cfg.vocab_size, rng.integers(1, 17)).tolist(),
                  max_tokens=int(rng.integers(1, h.DECODE + 1)), seed=int(rng.integers(1000)))
             for k in kinds]
    answers: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    sockets: list[socket.socket] = []

    with h.ServerThread(create_app(engine, served)) as server:
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

        def run(i, spec):
            kw = dict(model="tiny", prompt=spec["prompt"], max_tokens=spec["max_tokens"], temperature=0)
            try:
                if spec["kind"] == "plain":
                    text = api.completions.create(**kw).choices[0].text
                elif spec["kind"] == "seeded":
                    kw.update(temperature=0.8, seed=spec["seed"])
                    text = api.completions.create(**kw).choices[0].text
                else:
                    text = "".join(c.choices[0].text for c in api.completions.create(stream=True, **kw))
                answers[i] = [int(t) for t in text.split()]
            except BaseException as e:  # noqa: BLE001 (reported by the main thread)
                errors.append(e)

        threads = []
        for i, spec in enumerate(specs):
            if spec["kind"].startswith("drop"):
                sockets.append(_raw_request(server.port, dict(prompt=spec["prompt"], max_tokens=spec["max_tokens"],
                                                              temperature=0, stream=spec["kind"] == "drop_stream")))
            else:
                threads.append(threading.Thread(target=run, args=(i, spec)))
                threads[-1].start()
        _wait(lambda: engine.stats()["submitted_requests"] == CLIENTS, "every request to reach the engine")
        held = engine.stats()  # the first batch is held by the gate, the rest queued
        assert held["running"] >= 1 and held["running"] + held["queued"] == CLIENTS
        for sock in sockets:
            sock.close()
        _wait(lambda: engine.stats()["cancelled_requests"] == len(sockets), "the disconnects to cancel")
        engine.gate.set()
        for thread in threads:
            thread.join(timeout=600)
        assert not errors, errors

        split = engine.split
        for i, spec in enumerate(specs):
            if spec["kind"].startswith("drop"):
                continue  # no answer to check: the engine's cancelled_requests count above is the check
            if spec["kind"] == "seeded":
                assert answers[i] == _seeded_reference(split, spec["prompt"], spec["max_tokens"], spec["seed"], 0.8)
            else:
                assert answers[i] == h.greedy(split, spec["prompt"], spec["max_tokens"])[0], spec

        with urllib.request.urlopen(server.url + "/health") as r:
            assert json.load(r)["status"] == "ok"
        stats = h.wait_idle(engine)
        assert stats["submitted_requests"] == CLIENTS
        assert stats["finished_requests"] == CLIENTS - len(sockets)
        assert stats["cancelled_requests"] == len(sockets)
        assert stats["generated_tokens"] == sum(s["max_tokens"] for s in specs if not s["kind"].startswith("drop"))
        # still serving after the load
        again = api.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=5, temperature=0).choices[0].text
        assert [int(t) for t in again.split()] == h.greedy(split, [1, 2, 3], 5)[0]
