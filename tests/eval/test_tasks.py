"""The long-context tasks: deterministic generators of exact (token ids) or fitted (text) lengths, answers checked by
reading the prompts independently (a needle finder, an assignment interpreter, a word counter), and the scorer on
hand-made answers."""
import collections
import re

import pytest

from m1jax.eval.runner import parse_length
from m1jax.eval.tasks import TASKS, FrequentWords, NiahMultikey, Sample, VariableTracking, score
from m1jax.eval.vocab import IdVocabulary, TextVocabulary

ID_VOCAB = IdVocabulary(256)
TEXT_VOCAB = TextVocabulary()  # about four characters a token
VOCABS = {"ids": ID_VOCAB, "text": TEXT_VOCAB}


def is_content(vocab, word: str) -> bool:
    """Keys, values, variable names and coded words (never a word of the fixed phrases)."""
    if isinstance(vocab, IdVocabulary):
        return int(word) >= vocab.reserved
    return re.fullmatch(r"[a-z]{6}|\d{7}", word) is not None


@pytest.mark.parametrize("vocab", VOCABS.values(), ids=VOCABS)
@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_deterministic(name, vocab):
    task = TASKS[name]
    a, b = task.sample(vocab, 2048, seed=3, index=1), task.sample(vocab, 2048, seed=3, index=1)
    assert a == b
    others = [task.sample(vocab, 2048, seed=3, index=2), task.sample(vocab, 2048, seed=4, index=1)]
    assert all(o.words != a.words for o in others)
    assert all(o.answers != a.answers for o in others)


@pytest.mark.parametrize("length", [256, 1000, 4096, 32768])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_lengths(name, length):
    task = TASKS[name]
    assert ID_VOCAB.count(task.sample(ID_VOCAB, length).words) == length  # exact in token ids
    got = TEXT_VOCAB.count(task.sample(TEXT_VOCAB, length).words)
    assert length - 30 <= got <= length  # within one noise unit (a paragraph, or a coded word)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_million_tokens(name):
    sample = TASKS[name].sample(ID_VOCAB, 1 << 20)
    assert len(sample.words) == 1 << 20
    assert score(sample, " ".join(sample.answers), ID_VOCAB) == 1.0


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="shorter than the task's fixed text"):
        NiahMultikey().sample(ID_VOCAB, 50)


# ------------------------------------------------------------------------------------------------ the answers
def find(words, pattern):
    """Start positions where ``pattern`` (a list of words, None matching any) occurs."""
    n = len(pattern)
    return [i for i in range(len(words) - n + 1)
            if all(p is None or p == w for p, w in zip(pattern, words[i:i + n]))]


@pytest.mark.parametrize("vocab", VOCABS.values(), ids=VOCABS)
@pytest.mark.parametrize("task", [NiahMultikey(), NiahMultikey(num_keys=3, num_values=2)], ids=["1v", "2v"])
def test_niah_answers_are_the_asked_keys_values(vocab, task):
    for index in range(3):
        s = task.sample(vocab, 3000, index=index)
        words = list(s.words)
        needle = vocab.phrase("One of the special magic numbers for")
        hits = [i + len(needle) for i in find(words, needle)]
        pairs = collections.defaultdict(list)
        for at in hits:
            key, value = words[at], words[at + 1 + len(vocab.phrase("is:"))]
            pairs[key].append(value)
        question = vocab.phrase("What are all the special magic numbers for")
        asked = words[find(words, question)[-1] + len(question)]
        assert sorted(pairs[asked]) == sorted(s.answers) and len(s.answers) == task.num_values
        assert len(pairs) == task.num_keys
        values = [v for vs in pairs.values() for v in vs]
        assert len(set(values)) == len(values) and all(is_content(vocab, w) for w in values + list(pairs))


@pytest.mark.parametrize("vocab", VOCABS.values(), ids=VOCABS)
def test_variable_tracking_answers_by_interpreting_the_assignments(vocab):
    task = VariableTracking(num_chains=3, num_hops=3)
    var, eq, dot = vocab.phrase("VAR"), vocab.phrase("="), vocab.phrase(".")
    pattern = var + [None] + eq + [None] + dot
    for index in range(3):
        s = task.sample(vocab, 2000, index=index)
        words = list(s.words)
        values = {}
        for at in find(words, pattern):
            name, rhs = words[at + len(var)], words[at + len(var) + 1 + len(eq)]
            if not (is_content(vocab, name) and is_content(vocab, rhs)):
                continue
            assert name not in values  # each variable assigned once
            values[name] = values[rhs] if rhs in values else rhs  # a variable must be assigned before its use
        assert len(values) == 3 * 4
        question = vocab.phrase("Question: Find all variables that are assigned the value")
        asked = words[find(words, question)[-1] + len(question)]
        assert sorted(n for n, v in values.items() if v == asked) == sorted(s.answers)


@pytest.mark.parametrize("vocab", VOCABS.values(), ids=VOCABS)
def test_frequent_words_answers_by_counting(vocab):
    for length in (300, 5000):
        s = FrequentWords().sample(vocab, length)
        counts = collections.Counter(w for w in s.words if is_content(vocab, w))
        ranked = counts.most_common()
        assert {w for w, _ in ranked[:3]} == set(s.answers)
        assert ranked[2][1] > ranked[3][1]  # the three are not tied with a fourth


# ------------------------------------------------------------------------------------------------ scoring
TEXT_SAMPLE = Sample("t", 0, 100, ("x",), ("1234567", "7654321", "bakitu"), 8)
ID_SAMPLE = Sample("t", 0, 100, ("1",), ("40", "41"), 8)


@pytest.mark.parametrize("sample,vocab,answer,expected", [
    (TEXT_SAMPLE, TEXT_VOCAB, "The numbers are 1234567, 7654321 and bakitu.", 1.0),
    (TEXT_SAMPLE, TEXT_VOCAB, "bakitu: 7654321", 2 / 3),
    (TEXT_SAMPLE, TEXT_VOCAB, "1234567", 1 / 3),
    (TEXT_SAMPLE, TEXT_VOCAB, "12345678 7654320 bakitus", 0.0),  # whole words only
    (TEXT_SAMPLE, TEXT_VOCAB, "", 0.0),
    (ID_SAMPLE, ID_VOCAB, "41 7 40", 1.0),
    (ID_SAMPLE, ID_VOCAB, "400 41", 0.5),
    (ID_SAMPLE, ID_VOCAB, "4 0 4 1", 0.0),
])
def test_score(sample, vocab, answer, expected):
    assert score(sample, answer, vocab) == pytest.approx(expected)


def test_parse_length():
    assert [parse_length(x) for x in ("4096", "4k", "1m", "0.5k", " 32K ")] == [4096, 4096, 1 << 20, 512, 32768]
    with pytest.raises(ValueError, match="not a number of tokens"):
        parse_length("lots")


def test_id_vocabulary_keeps_phrases_and_content_apart():
    vocab = IdVocabulary(64)
    phrase = vocab.phrase("The grass is green.")
    assert phrase == vocab.phrase("The grass is green.") and all(0 < int(w) < vocab.reserved for w in phrase)
    import numpy as np
    drawn = vocab.draw(np.random.default_rng(0), 48)
    assert sorted(map(int, drawn)) == list(range(16, 64))
    with pytest.raises(ValueError, match="49 distinct content words"):
        vocab.draw(np.random.default_rng(0), 49)
