"""Packing, token files, the tokenizer step and the synthetic iterator: contents, determinism and exact resume."""
import numpy as np
import pytest

from m1jax import data as D
from m1jax.rl.tasks import ArithmeticTask


def _docs():
    rng = np.random.default_rng(0)
    return [list(rng.integers(3, 50, int(n))) for n in rng.integers(1, 30, 40)]


def test_token_file_roundtrip_and_truncation(tmp_path):
    docs = _docs()
    header = D.write_token_file(tmp_path / "c", docs, vocab_size=50)
    assert header["n_docs"] == len(docs) and header["dtype"] == "uint16"
    tf = D.TokenFile(tmp_path / "c")
    for i in (0, 7, len(docs) - 1):
        assert list(tf.doc(i)) == docs[i]
    with open(tmp_path / "c.tokens", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(D.DataError, match="c.tokens has 10 bytes"):
        D.TokenFile(tmp_path / "c")


def test_packed_batches_cover_documents_in_order(tmp_path):
    docs = _docs()
    D.write_token_file(tmp_path / "c", docs, vocab_size=50)
    it = D.PackedTokenIterator(D.TokenFile(tmp_path / "c"), batch=2, seq_len=15, seed=3, shuffle=False)
    stream = np.concatenate([np.asarray(d) for d in docs])
    doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    pos_of = np.concatenate([np.arange(len(d)) for d in docs])
    cursor = 0
    for _ in range(5):
        b = next(it)
        for r in range(2):
            row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])  # the row's T + 1 tokens
            np.testing.assert_array_equal(row, stream[cursor:cursor + 16])
            np.testing.assert_array_equal(b["positions"][r], pos_of[cursor:cursor + 15])
            same_doc = doc_of[cursor:cursor + 15] == doc_of[cursor + 1:cursor + 16]
            np.testing.assert_array_equal(b["loss_mask"][r], same_doc)
            # segment ids change exactly where documents do
            np.testing.assert_array_equal(np.diff(b["segment_ids"][r]) != 0,
                                          doc_of[cursor + 1:cursor + 15] != doc_of[cursor:cursor + 14])
            cursor += 16


def test_iterator_state_resumes_exactly(tmp_path):
    D.write_token_file(tmp_path / "c", _docs(), vocab_size=50)
    make = lambda: D.PackedTokenIterator(D.TokenFile(tmp_path / "c"), batch=3, seq_len=31, seed=7)  # noqa: E731
    straight = make()
    batches = [next(straight) for _ in range(12)]  # > one epoch: crosses the reshuffle
    assert straight.state()["epoch"] >= 1
    first = make()
    for _ in range(5):
        next(first)
    resumed = make()
    resumed.restore(dict(first.state()))
    for b in batches[5:]:
        got = next(resumed)
        for k in b:
            np.testing.assert_array_equal(got[k], b[k])
    with pytest.raises(D.DataError, match="seed"):
        D.PackedTokenIterator(D.TokenFile(tmp_path / "c"), 3, 31, seed=8).restore(first.state())


def test_tokenizer_json_to_token_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<eod>": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.jsonl").write_text('{"text": "the cat sat"}\n{"text": "on the mat"}\n')
    (tmp_path / "b.txt").write_text("cat dog")
    texts = D.read_texts([tmp_path / "a.jsonl", tmp_path / "b.txt"])
    header = D.tokenize_to_file(tmp_path / "tokenizer.json", texts, tmp_path / "out", eos_token="<eod>")
    tf = D.TokenFile(tmp_path / "out")
    assert header["vocab_size"] == 7
    assert [list(tf.doc(i)) for i in range(3)] == [[2, 3, 4, 1], [5, 2, 6, 1], [3, 0, 1]]
    with pytest.raises(D.DataError, match="no token"):
        D.tokenize_to_file(tmp_path / "tokenizer.json", ["x"], tmp_path / "o2", eos_token="</s>")


def test_arithmetic_iterator():
    it = D.ArithmeticIterator(ArithmeticTask(), batch=4, seed=1)
    b0, b1 = next(it), next(it)
    again = D.ArithmeticIterator(ArithmeticTask(), batch=4, seed=1)
    again.restore({"step": 1, "seed": 1})
    np.testing.assert_array_equal(next(again)["inputs"], b1["inputs"])
    assert b0["inputs"].shape == (4, it.seq_len) and b0["loss_mask"].any()
    # the loss covers answer digits and EOS only: every masked target is a digit or EOS
    targets = b0["targets"][b0["loss_mask"]]
    assert np.all((targets == it.tokenizer.EOS) | np.isin(targets, it.tokenizer.digit_ids))
    with pytest.raises(D.DataError, match="unknown synthetic"):
        D.make_iterator("synthetic:div", 2, None)
