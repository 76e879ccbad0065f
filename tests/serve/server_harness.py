"""Test support for the HTTP server: a tiny checkpoint with a word-level tokenizer and MiniMax-M1's chat template,
the server on a free localhost port in a background thread, and m1jax.generate answers to compare with.

Every server test uses the same shapes (batch 4, prompts of at most 16 tokens, chunk 16, decode length 16), so the
whole set compiles one prefill and one decode program, shared with the reference ``greedy`` below.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np

from m1jax import generate as gen
from m1jax.config import ModelConfig, m1_layer_types

M1_TOKENIZER_CONFIG = Path(__file__).resolve().parents[1] / "data" / "minimax-m1" / "tokenizer_config.json"
SPECIALS = ("<end_of_document>", "<begin_of_document>", "<beginning_of_sentence>", "<end_of_sentence>")
TEMPLATE_WORDS = ("user", "name=user", "ai", "name=assistant", "system", "ai_setting=assistant")
VOCAB_SIZE = 64
WORDS = SPECIALS + TEMPLATE_WORDS + tuple(f"w{i}" for i in range(VOCAB_SIZE - len(SPECIALS) - len(TEMPLATE_WORDS)))
EOS_ID = WORDS.index("<end_of_sentence>")
BATCH, CHUNK, DECODE = 4, 16, 16
MAX_POSITIONS = 128


def tiny_config() -> ModelConfig:
    """Two (lightning, softmax) periods, vocabulary 64, 128 positions; initializer 0.15 for varied logits."""
    return ModelConfig.tiny(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=4,
                            layer_types=m1_layer_types(4, 2), num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                            rotary_dim=4, block_size=4, max_position_embeddings=MAX_POSITIONS, initializer_range=0.15)


# The continuous engine (the server's default) at the shapes above: 4 slots, 16-token chunks, fp32 KV pages.
ENGINE_SETTINGS = (f"max_batch={BATCH}", f"max_context={MAX_POSITIONS}", "page_size=8", f"chunk_size={CHUNK}",
                   f"token_budget={BATCH + CHUNK}", f"snapshot_interval={CHUNK}", f"min_chunk={CHUNK}",
                   f"min_decode_rows={BATCH}", f"min_context_bucket={MAX_POSITIONS}", "kv_dtype=float32")


def engine_config():
    """The static engine's settings at the shapes above (its own tests and the load test)."""
    from m1jax.serve.static import StaticEngineConfig
    return StaticEngineConfig(max_batch_size=BATCH, batch_timeout_s=0.02, chunk_size=CHUNK, kv_dtype="float32",
                              min_new_tokens_bucket=DECODE)


def write_tokenizer(directory: str | os.PathLike) -> None:
    """tokenizer.json (word level, whitespace split, M1's special tokens) and tokenizer_config.json (M1's, with a
    class transformers loads from tokenizer.json alone)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<end_of_document>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(w, special=True) for w in SPECIALS])
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config = json.loads(M1_TOKENIZER_CONFIG.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
        json.dump(config, fh, indent=1)


def write_checkpoint(directory: str | os.PathLike, seed: int = 0) -> str:
    """An HF checkpoint directory: the tiny model (random weights from ``seed``) and the tokenizer."""
    from m1jax.convert import export_hf
    from m1jax.model import init_model
    export_hf(init_model(tiny_config(), seed), directory)
    write_tokenizer(directory)
    return os.fspath(directory)


class ServerThread:
    """uvicorn serving ``app`` on a free localhost port in a daemon thread."""

    def __init__(self, app):
        import uvicorn
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.socket.close()


@contextlib.contextmanager
def serving(source, name: str = "tiny-m1"):
    """(ServerThread, engine, ServedModel) for a ``m1jax.serve.loading.ServedModelSource``: the server over the
    continuous engine, as ``experiments.serve`` runs it."""
    from m1jax.serve.engines import build_engine
    from m1jax.serve.server import ServedModel, create_app
    engine = build_engine("continuous", source.model, ENGINE_SETTINGS)
    served = ServedModel(name, source.config.vocab_size, source.config.max_position_embeddings, source.text)
    with ServerThread(create_app(engine, served)) as thread:
        yield thread, engine, served


def greedy(split, prompt, max_tokens: int, stop_ids=()) -> tuple[list[int], list[float]]:
    """m1jax.generate's greedy tokens and raw-model log-probs for one prompt (padded to the engine's batch so the
    compiled programs are shared); cut at ``max_tokens`` as the API cuts."""
    out = gen.generate(split, [list(prompt)] + [[0]] * (BATCH - 1), max_new_tokens=DECODE,
                       sampling=gen.Sampling.greedy(), stop=gen.StopRules.make(stop_ids, truncate_after=0),
                       chunk_size=CHUNK, kv_dtype="float32")
    n = min(int(out.lengths[0]), max_tokens)
    return np.asarray(out.tokens[0, :n]).tolist(), np.asarray(out.model_logprobs[0, :n]).tolist()


def wait_idle(engine, timeout: float = 60.0) -> dict:
    """The engine's stats once nothing is queued or running (raises after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["queued"] == 0 and stats["running"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"the engine is not idle: {stats}")
        time.sleep(0.05)
