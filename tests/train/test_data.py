"""Token files, packed row streams, raw-text tokenisation, synthetic rows and the loaders: contents against the
documents themselves, one stream per global row, exact resume, and any split of the rows across processes giving
the rows of the one-process batch."""
import jax
import numpy as np
import pytest

from m1jax import data as D
from m1jax.rl.tasks import ArithmeticTask, CharTokenizer, teacher_sft_batch
from sharding.mesh import make_mesh
from sharding.rules import batch_sharding


def _docs():
    rng = np.random.default_rng(0)
    return [list(rng.integers(3, 50, int(n))) for n in rng.integers(1, 30, 40)]


def _row_tokens(batch, r):
    """The T + 1 tokens row ``r`` was cut from."""
    return np.concatenate([batch["inputs"][r], batch["targets"][r, -1:]])


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


def test_each_row_packs_its_own_documents_in_order(tmp_path):
    """Unshuffled, row r of a batch of B packs documents r, r + B, r + 2B, ... continuously (a document cut at a
    row's end continues in that row's next step, positions too)."""
    docs = _docs()
    D.write_token_file(tmp_path / "c", docs, vocab_size=50)
    b, t, steps = 3, 15, 6
    loader = D.BatchLoader(D.PackedTokenSource(tmp_path / "c", t, seed=3, shuffle=False), b)
    batches = [next(loader) for _ in range(steps)]
    for r in range(b):
        mine = [docs[i % len(docs)] for i in range(r, 3 * len(docs), b)]
        stream = np.concatenate([np.asarray(d) for d in mine])
        doc_of = np.concatenate([np.full(len(d), i) for i, d in enumerate(mine)])
        pos_of = np.concatenate([np.arange(len(d)) for d in mine])
        cursor = 0
        for batch in batches:
            np.testing.assert_array_equal(_row_tokens(batch, r), stream[cursor:cursor + t + 1])
            np.testing.assert_array_equal(batch["positions"][r], pos_of[cursor:cursor + t])
            same_doc = doc_of[cursor:cursor + t] == doc_of[cursor + 1:cursor + t + 1]
            np.testing.assert_array_equal(batch["loss_mask"][r], same_doc)
            # segment ids start at 1 in every row and change exactly where documents do
            assert batch["segment_ids"][r, 0] == 1
            np.testing.assert_array_equal(np.diff(batch["segment_ids"][r]) != 0,
                                          doc_of[cursor + 1:cursor + t] != doc_of[cursor:cursor + t - 1])
            cursor += t + 1


def test_shuffled_rows_share_one_order_that_is_a_new_permutation_each_epoch(tmp_path):
    """Each document is one repeated token (its id + 3) with a known length, so the documents every row read can be
    recovered from its tokens; interleaved by row (position r + jB) they hold every document once per epoch."""
    n, b, t = 12, 3, 6
    docs = [[i + 3] * (1 + i % 4) for i in range(n)]
    D.write_token_file(tmp_path / "u", docs, vocab_size=n + 3)
    loader = D.BatchLoader(D.PackedTokenSource(tmp_path / "u", t, seed=5), b)
    batches = [next(loader) for _ in range(12)]
    per_row = []
    for r in range(b):
        tokens = np.concatenate([_row_tokens(batch, r) for batch in batches])
        runs = np.split(tokens, np.flatnonzero(np.diff(tokens)) + 1)  # a run: whole copies of one document
        per_row.append([int(run[0]) - 3 for run in runs for _ in range(-(-len(run) // len(docs[run[0] - 3])))])
    order = [per_row[j % b][j // b] for j in range(2 * n)]
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:]) == list(range(n))
    assert order[:n] != order[n:] and order[:n] != list(range(n))


def test_state_resumes_exactly_on_any_split_of_the_rows(tmp_path):
    D.write_token_file(tmp_path / "c", _docs(), vocab_size=50)
    source = D.PackedTokenSource(tmp_path / "c", 31, seed=7)
    straight = D.BatchLoader(source, 4)
    batches = [next(straight) for _ in range(12)]  # > one epoch: crosses the reshuffle
    first = D.BatchLoader(source, 4)
    for _ in range(5):
        next(first)
    saved = first.state()
    # two "processes" resuming rows {0, 1} and {2, 3} from the one-process state ...
    halves = [D.BatchLoader(source, 4, rows=rows) for rows in ((0, 1), (2, 3))]
    for half in halves:
        half.restore(saved)
    # ... and one process resuming from the states those two save
    got = [[next(h) for _ in range(3)] for h in halves]
    whole = D.BatchLoader(source, 4)
    whole.restore([h.state() for h in halves])
    for i, want in enumerate(batches[5:8]):
        for k in D.BATCH_KEYS:
            np.testing.assert_array_equal(np.concatenate([got[0][i][k], got[1][i][k]]), want[k])
    for want in batches[8:]:
        batch = next(whole)
        for k in D.BATCH_KEYS:
            np.testing.assert_array_equal(batch[k], want[k])
    with pytest.raises(D.DataError, match="seed"):
        D.BatchLoader(D.PackedTokenSource(tmp_path / "c", 31, seed=8), 4).restore(saved)
    with pytest.raises(D.DataError, match="global batch of 4 rows"):
        D.BatchLoader(source, 2).restore(saved)
    with pytest.raises(D.DataError, match=r"lacks rows \[0, 1\]"):
        D.BatchLoader(source, 4).restore(halves[1].state())


def test_sharded_loader_gives_each_device_its_rows_of_the_global_batch(tmp_path):
    D.write_token_file(tmp_path / "c", _docs(), vocab_size=50)
    source = D.PackedTokenSource(tmp_path / "c", 16, seed=1)
    mesh = make_mesh("data=4,expert=2")
    sharding = batch_sharding(mesh, (8, 16))
    loader = D.ShardedBatchLoader(source, 8, sharding)
    assert loader.rows == tuple(range(8))  # one process holds every row
    reference = D.BatchLoader(source, 8)
    for _ in range(2):
        got, want = next(loader), next(reference)
        for k in D.BATCH_KEYS:
            assert got[k].sharding == sharding
            for shard in got[k].addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), want[k][shard.index])
            np.testing.assert_array_equal(np.asarray(jax.device_get(got[k])), want[k])


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


def test_arithmetic_rows_are_drawn_per_seed_step_and_row():
    source = D.ArithmeticSource(ArithmeticTask(), seed=1)
    loader = D.BatchLoader(source, 4)
    b0, b1 = next(loader), next(loader)
    tok = CharTokenizer()
    for step, batch in enumerate((b0, b1)):
        for r in range(4):
            tokens, mask = teacher_sft_batch(ArithmeticTask(), tok, np.random.default_rng([1, step, r]), 1,
                                             source.seq_len + 1)
            np.testing.assert_array_equal(batch["inputs"][r], tokens[0, :-1])
            np.testing.assert_array_equal(batch["targets"][r], tokens[0, 1:])
            np.testing.assert_array_equal(batch["loss_mask"][r], mask[0, 1:])
            np.testing.assert_array_equal(batch["segment_ids"][r], tokens[0, :-1] != tok.PAD)
    assert b0["inputs"].shape == (4, source.seq_len) and b0["loss_mask"].any()
    # the loss covers answer digits and EOS only
    targets = b0["targets"][b0["loss_mask"]]
    assert np.all((targets == tok.EOS) | np.isin(targets, tok.digit_ids))
    again = D.BatchLoader(source, 4, rows=[2, 3])
    again.restore({"seed": 1, "global_batch": 4, "rows": {str(r): {"next_index": 1} for r in range(4)}})
    np.testing.assert_array_equal(next(again)["inputs"], b1["inputs"][2:])
    with pytest.raises(D.DataError, match="unknown synthetic task 'div'"):
        D.make_source("synthetic:div", 2, None)


def test_make_source_errors(tmp_path):
    D.write_token_file(tmp_path / "c", _docs(), vocab_size=50)
    with pytest.raises(D.DataError, match="needs a sequence length"):
        D.make_source(str(tmp_path / "c"), None)
    with pytest.raises(D.DataError, match="neither synthetic:add, synthetic:mul nor a token file"):
        D.make_source(str(tmp_path / "nothing"), 8)
    with pytest.raises(D.DataError, match="shorter than the task's longest"):
        D.make_source("synthetic:add", 5)
    assert isinstance(D.make_source(str(tmp_path / "c"), 8), D.PackedTokenSource)
