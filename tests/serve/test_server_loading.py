"""Where served models come from (m1jax.serve.loading): an HF checkpoint, a converted parameter directory, a
training run directory; and the experiments.serve entry point."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest
from flax import nnx

from m1jax.checkpoint import Checkpointer, flatten_state

from m1jax.config.files import write_config
from m1jax.convert import from_hf
from m1jax.model import init_model
from m1jax.serve.loading import load_served_model
from m1jax.serve.text import TokenIdText, TokenizerText
from m1jax.train.config import TrainConfig
from m1jax.train.state import init_train_state
from m1jax.weights import convert_hf
from tests.serve import server_harness as h

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return h.write_checkpoint(tmp_path_factory.mktemp("hf"), seed=6)


def params_of(model):
    return {k: np.asarray(v) for k, v in flatten_state(nnx.state(model, nnx.Param)).items()}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def test_hf_checkpoint_with_its_tokenizer(checkpoint):
    source = load_served_model(hf_checkpoint=checkpoint)
    assert_same_params(source.model, from_hf(checkpoint)[1])
    assert isinstance(source.text, TokenizerText) and source.text.eos_token_ids == (h.EOS_ID,)
    assert source.text.chat_template == json.loads(h.M1_TOKENIZER_CONFIG.read_text())["chat_template"]
    assert source.config.vocab_size == h.VOCAB_SIZE


def test_converted_parameter_directory(checkpoint, tmp_path):
    out = tmp_path / "params_dir"
    convert_hf(checkpoint, out, log=lambda _: None)
    source = load_served_model(params_dir=str(out))
    assert_same_params(source.model, from_hf(checkpoint)[1])
    assert isinstance(source.text, TokenIdText)  # no tokenizer there ...
    assert isinstance(load_served_model(params_dir=str(out), tokenizer_dir=checkpoint).text, TokenizerText)  # ...


def test_training_run_directory(tmp_path):
    cfg = h.tiny_config()
    model = init_model(cfg, 9)
    params = nnx.state(model, nnx.Param)
    params = jax.tree_util.tree_map(lambda x: x * 1.5, params)  # trained: not what init gives
    tc = TrainConfig()
    write_config(tmp_path, model=cfg, train=tc)
    checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
    checkpointer.save(7, init_train_state(params, tc, 0), {}, force=True)
    checkpointer.close()
    source = load_served_model(params_dir=str(tmp_path))
    nnx.update(model, params)
    assert_same_params(source.model, model)
    assert "run directory" in source.description


@pytest.mark.parametrize("kwargs,message", [
    (dict(hf_checkpoint="a", params_dir="b"), "not both"),
    (dict(params_dir="/no/such/dir"), "does not exist"),
    (dict(tokenizer_dir="/"), "no tokenizer.json"),
])
def test_bad_sources(kwargs, message):
    with pytest.raises(ValueError, match=message):  # ConfigError or CheckpointError: both the user's to fix
        load_served_model(**kwargs)


# ------------------------------------------------------------------------------------------------ entry point
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_experiments_serve(checkpoint):
    port = _free_port()
    args = [sys.executable, "-m", "experiments.serve", f"--hf_checkpoint={checkpoint}", f"--port={port}",
            "--served_model_name=m1-tiny", "--log_level=warning", *(f"--engine_set={s}" for s in h.ENGINE_SETTINGS)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    assert json.load(r)["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline
                time.sleep(0.5)
        body = json.dumps({"model": "m1-tiny", "prompt": [11, 12, 13], "max_tokens": 5, "temperature": 0,
                           "ignore_eos": True}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as r:
            text = json.load(r)["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    source = load_served_model(hf_checkpoint=checkpoint)
    tokens, _ = h.greedy(nnx.split(source.model), [11, 12, 13], 5)
    assert text == " ".join(h.WORDS[t] for t in tokens if t >= len(h.SPECIALS))


@pytest.mark.parametrize("flags,message", [(["--engine=paged"], "unknown engine 'paged'"),
                                           (["--params_dir=/no/such/dir"], "not a directory"),
                                           (["--engine_set=max_batch=0"], "must be >= 1"),
                                           (["--engine=static", "--engine_set=max_batch=4"], "unknown config key 'max_batch'"),
                                           (["--engine_set=max_context=100000"], "exceeds the model's")])
def test_experiments_serve_refuses_bad_flags(flags, message):
    proc = subprocess.run([sys.executable, "-m", "experiments.serve", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and message in proc.stderr
