"""The long-context evaluation through the HTTP server, an engine and m1jax.generate gives the same answers and
scores; experiments.eval is a thin main over it."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from m1jax.eval import runner
from m1jax.eval.vocab import IdVocabulary, TextVocabulary
from m1jax.serve.loading import load_served_model
from m1jax.serve.text import TokenIdText
from tests.serve import server_harness as h

TASKS = ["niah_multikey", "variable_tracking", "frequent_words"]
LENGTH = 100  # + 16 new tokens fits the tiny model's 128 positions; prompts bucket to 112 (one compiled shape)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return load_served_model(hf_checkpoint=h.write_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5))


def _vocab(text):
    if isinstance(text, TokenIdText):
        return IdVocabulary(h.VOCAB_SIZE)
    return TextVocabulary(lambda s: len(text.encode(s)), pool=h.WORDS[len(h.SPECIALS) + len(h.TEMPLATE_WORDS):])


@pytest.mark.parametrize("tokenizer", [False, True], ids=["token-ids", "word-tokenizer"])
def test_server_engine_and_generate_agree(source, tokenizer):
    if not tokenizer:
        source = dataclasses.replace(source, text=TokenIdText())
    vocab = _vocab(source.text)
    with h.serving(source) as (server, engine, _):
        completers = {"http": runner.HttpCompleter(server.url, "tiny-m1"),
                      "engine": runner.EngineCompleter(engine, source.text),
                      "generate": runner.GenerateCompleter(engine.split, source.text, batch_size=h.BATCH,
                                                           chunk_size=h.CHUNK, kv_dtype="float32")}
        results = {name: runner.evaluate(c, vocab, TASKS, [LENGTH], samples=3, seed=1, max_new_tokens=h.DECODE)
                   for name, c in completers.items()}
    for task in TASKS:
        answers = [results[name][task][LENGTH]["answers"] for name in completers]
        assert answers[0] == answers[1] == answers[2]
        assert len(set(answers[0])) > 1  # different prompts, different answers
        assert results["http"][task][LENGTH] == results["generate"][task][LENGTH]


class Oracle:
    """Answers with the expected words (or nothing)."""

    def __init__(self, right: bool):
        self.right = right

    def complete(self, samples, vocab):
        return [" ".join(s.answers) if self.right else "" for s in samples]


def test_scores_of_right_and_wrong_answers():
    vocab = IdVocabulary(256)
    for right, expected in ((True, 1.0), (False, 0.0)):
        results = runner.evaluate(Oracle(right), vocab, TASKS, [1000, 4096], samples=2)
        assert {r["score"] for task in TASKS for r in results[task].values()} == {expected}


def test_experiments_eval_against_the_server(source, tmp_path):
    source = dataclasses.replace(source, text=TokenIdText())
    out = tmp_path / "scores.json"
    with h.serving(source) as (server, _, _):
        direct = runner.evaluate(runner.HttpCompleter(server.url), IdVocabulary(h.VOCAB_SIZE), ["niah_multikey"],
                                 [LENGTH], samples=2, seed=7, max_new_tokens=h.DECODE)
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.eval", f"--server_url={server.url}", f"--vocab_size={h.VOCAB_SIZE}",
             "--tasks=niah_multikey", f"--lengths={LENGTH}", "--samples=2", "--seed=7", f"--max_new_tokens={h.DECODE}",
             f"--out={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"niah_multikey @ {LENGTH} tokens" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["niah_multikey"][str(LENGTH)] == direct["niah_multikey"][LENGTH]


def test_experiments_eval_refuses_a_server_without_a_vocabulary():
    proc = subprocess.run([sys.executable, "-m", "experiments.eval", "--server_url=http://127.0.0.1:9"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "--tokenizer_dir" in proc.stderr
