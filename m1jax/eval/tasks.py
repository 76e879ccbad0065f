"""RULER-style synthetic long-context tasks: seeded generators of prompts of a chosen length, and their scorers.

Every task is a ``Task`` whose ``sample(vocab, length, seed, index)`` returns a ``Sample`` (the prompt as words of a
``m1jax.eval.vocab.Vocabulary``, the expected answer words, the tokens to generate). The same arguments give the
same sample: the random stream is seeded by (seed, task name, length, index). The prompt takes at most ``length``
tokens as ``vocab.count`` measures them and, for lengths that fit the task's fixed text, no fewer than ``length``
minus one noise unit (an id vocabulary hits ``length`` exactly).

Tasks (after RULER; the answer words must appear in the model's answer):

* ``niah_multikey``: needles "One of the special magic numbers for KEY is: VALUE ." hidden at random depths in
  noise sentences, several keys; the question asks for one key's values.
* ``variable_tracking``: chains of assignments "VAR X1 = V", "VAR X2 = X1", ... among noise sentences, with
  distractor chains; the question asks for every variable that holds V.
* ``frequent_words``: a text of coded words drawn from a Zipf distribution; the question asks for the three most
  frequent ones (their counts are made strictly larger than every other word's).

``score(sample, answer_text, vocab)``: the fraction of the expected words that appear as whole words in the answer
(RULER's ``string_match_all``): 1 right, 0 wrong, in between partially right.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable, Sequence

import numpy as np

from m1jax.eval.vocab import Vocabulary

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    index: int
    length: int                      # the target length in tokens
    words: tuple[str, ...]           # the prompt
    answers: tuple[str, ...]         # words the answer must contain
    max_new_tokens: int

    def prompt(self, vocab: Vocabulary) -> str:
        return vocab.join(self.words)


def score(sample: Sample, answer: str, vocab: Vocabulary) -> float:
    """Fraction of ``sample.answers`` present as whole words in ``answer``."""
    found = set(vocab.split(answer))
    return sum(a in found for a in sample.answers) / len(sample.answers)


def rng_for(task: str, length: int, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def _fit(vocab: Vocabulary, length: int, build: Callable[[int], list[str]], per_unit: float, fixed: int) -> list[str]:
    """``build(n)`` with the largest ``n`` (noise units) whose prompt fits ``length`` tokens.

    ``fixed`` is the tokens of the prompt without noise and ``per_unit`` the tokens of one unit; the estimate is
    corrected by measuring (a tokenizer's counts are not additive across word boundaries)."""
    if fixed > length:
        raise ValueError(f"length {length} is shorter than the task's fixed text ({fixed} tokens)")
    n = max(0, int((length - fixed) / per_unit))
    words = build(n)
    total = vocab.count(words)
    while total > length:
        if n == 0:
            raise ValueError(f"length {length} is shorter than the task's fixed text ({total} tokens)")
        n = max(0, n - max(1, math.ceil((total - length) / per_unit)))
        words = build(n)
        total = vocab.count(words)
    step = max(1, int((length - total) / per_unit))
    while True:  # grow while it still fits (the estimate may undershoot)
        more = build(n + step)
        more_total = vocab.count(more)
        if more_total <= length:
            n, words, total = n + step, more, more_total
            step = max(1, int((length - total) / per_unit))
        elif step > 1:
            step //= 2
        else:
            return words


def _haystack(vocab: Vocabulary, head: Sequence[str], inserts: Sequence[Sequence[str]], tail: Sequence[str],
              length: int, rng: np.random.Generator, unit_words: int | None = None) -> list[str]:
    """head + noise with ``inserts`` at random depths (in order) + tail, fitted to ``length`` tokens.

    Text noise is whole sentences; id noise is cut word by word so the length is met exactly."""
    sentences = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
    noise_words = [w for s in sentences for w in vocab.phrase(s)]
    unit = unit_words or len(noise_words)  # noise words per unit (sentence boundaries for text)
    depths = np.sort(rng.random(len(inserts)))
    fixed_words = list(head) + [w for ins in inserts for w in ins] + list(tail)

    def build(n_units: int) -> list[str]:
        n_words = n_units * unit
        noise = (noise_words * (n_words // len(noise_words) + 1))[:n_words]
        cuts = [int(round(d * n_units)) * unit for d in depths]
        out, at = list(head), 0
        for cut, ins in zip(cuts, inserts):
            out += noise[at:cut] + list(ins)
            at = cut
        return out + noise[at:] + list(tail)

    per_unit = vocab.count(noise_words * 8) / (8 * len(noise_words) / unit)
    return _fit(vocab, length, build, per_unit, vocab.count(fixed_words))


class Task:
    name = ""

    def sample(self, vocab: Vocabulary, length: int, seed: int = 0, index: int = 0) -> Sample:
        raise NotImplementedError

    def samples(self, vocab: Vocabulary, length: int, n: int, seed: int = 0) -> list[Sample]:
        return [self.sample(vocab, length, seed, i) for i in range(n)]


def _unit(vocab: Vocabulary) -> int | None:
    """Noise granularity: one word for an id vocabulary (exact lengths), whole sentences for text."""
    from m1jax.eval.vocab import IdVocabulary
    return 1 if isinstance(vocab, IdVocabulary) else None


@dataclasses.dataclass(frozen=True)
class NiahMultikey(Task):
    num_keys: int = 4          # needles with distinct keys (one is asked for, the others distract)
    num_values: int = 1        # values of the asked key (all must be found)
    name: str = "niah_multikey"

    def sample(self, vocab, length, seed=0, index=0):
        rng = rng_for(self.name, length, seed, index)
        keys = vocab.draw(rng, self.num_keys, "word")
        values = vocab.draw(rng, self.num_keys - 1 + self.num_values, "number", exclude=keys)
        asked = keys[0]
        pairs = [(asked, v) for v in values[:self.num_values]] + list(zip(keys[1:], values[self.num_values:]))
        order = rng.permutation(len(pairs))
        needles = [vocab.phrase("One of the special magic numbers for") + [k] + vocab.phrase("is:") + [v] +
                   vocab.phrase(".") for k, v in (pairs[i] for i in order)]
        head = vocab.phrase("Some special magic numbers are hidden within the following text. Make sure to "
                            "memorize them. I will quiz you about the numbers afterwards.")
        tail = (vocab.phrase("What are all the special magic numbers for") + [asked] +
                vocab.phrase("mentioned in the provided text? The special magic numbers for") + [asked] +
                vocab.phrase("mentioned in the provided text are"))
        words = _haystack(vocab, head, needles, tail, length, rng, _unit(vocab))
        answers = tuple(values[:self.num_values])
        return Sample(self.name, index, length, tuple(words), answers, max_new_tokens=16 * len(answers))


@dataclasses.dataclass(frozen=True)
class VariableTracking(Task):
    num_chains: int = 2        # one asked for, the others distract
    num_hops: int = 4          # assignments after the first: the asked chain has num_hops + 1 variables
    name: str = "variable_tracking"

    def sample(self, vocab, length, seed=0, index=0):
        rng = rng_for(self.name, length, seed, index)
        n_vars = self.num_chains * (self.num_hops + 1)
        names = vocab.draw(rng, n_vars, "word")
        values = vocab.draw(rng, self.num_chains, "number", exclude=names)
        chains = [names[c * (self.num_hops + 1):(c + 1) * (self.num_hops + 1)] for c in range(self.num_chains)]
        statements = []  # (chain, hop, words); a chain's statements stay in order
        for c, (chain, value) in enumerate(zip(chains, values)):
            statements.append((c, 0, vocab.phrase("VAR") + [chain[0]] + vocab.phrase("=") + [value] +
                               vocab.phrase(".")))
            for h in range(1, len(chain)):
                statements.append((c, h, vocab.phrase("VAR") + [chain[h]] + vocab.phrase("=") + [chain[h - 1]] +
                                   vocab.phrase(".")))
        # interleave the chains at random while keeping each chain's order
        owners = rng.permutation([c for c in range(self.num_chains) for _ in range(self.num_hops + 1)])
        queues = {c: [s for s in statements if s[0] == c] for c in range(self.num_chains)}
        ordered = [queues[c].pop(0)[2] for c in owners]
        head = vocab.phrase("Memorize and track the chain(s) of variable assignment hidden in the following text.")
        tail = (vocab.phrase("Question: Find all variables that are assigned the value") + [values[0]] +
                vocab.phrase("in the text above. Answer: According to the chain(s) of variable assignment in the "
                             "text above, the variables assigned the value") + [values[0]] + vocab.phrase("are:"))
        words = _haystack(vocab, head, ordered, tail, length, rng, _unit(vocab))
        return Sample(self.name, index, length, tuple(words), tuple(chains[0]),
                      max_new_tokens=8 * (self.num_hops + 1))


@dataclasses.dataclass(frozen=True)
class FrequentWords(Task):
    num_words: int = 24        # distinct coded words
    top: int = 3               # how many of the most frequent are asked for
    alpha: float = 1.5         # Zipf exponent of the word counts
    name: str = "frequent_words"

    def sample(self, vocab, length, seed=0, index=0):
        rng = rng_for(self.name, length, seed, index)
        words = vocab.draw(rng, self.num_words, "word")
        head = vocab.phrase("Read the following coded text and track the frequency of each coded word. Find the "
                            f"{self.top} most frequently appeared coded words.")
        tail = vocab.phrase(f"Question: What are the {self.top} most frequently appeared words in the above coded "
                            f"text? Answer: According to the coded text above, the {self.top} most frequently "
                            "appeared words are:")
        weights = 1.0 / np.arange(1, self.num_words + 1) ** self.alpha
        weights /= weights.sum()
        shuffle_seed = int(rng.integers(2 ** 32))

        def build(n: int) -> list[str]:
            counts = _counts(weights, n, self.top)
            text = [words[i] for i, c in enumerate(counts) for _ in range(c)]
            order = np.random.default_rng([shuffle_seed, n]).permutation(len(text))
            return list(head) + [text[j] for j in order] + list(tail)

        per_word = vocab.count(words * 4) / (4 * len(words))
        prompt = _fit(vocab, length, build, per_word, vocab.count(list(head) + list(tail)) +
                      math.ceil(per_word * _min_words(self.num_words, self.top)))
        return Sample(self.name, index, length, tuple(prompt), tuple(words[:self.top]),
                      max_new_tokens=8 * self.top)


def _min_words(num_words: int, top: int) -> int:
    """The fewest words with strictly larger counts for the top ``top``: top words counted 2 and one other word."""
    return 2 * top + 1 if num_words > top else top


def _counts(weights: np.ndarray, n: int, top: int) -> list[int]:
    """Counts of at least ``n`` words by ``weights`` (descending) whose first ``top`` exceed every other count."""
    n = max(n, _min_words(len(weights), top))
    counts = np.floor(weights * n).astype(int)
    rest = counts[top:]
    counts[:top] = np.maximum(counts[:top], (rest.max() if rest.size else 0) + 1)
    excess = int(counts.sum()) - n
    while excess > 0 and rest.size and rest.max() > 0:  # give back from the largest of the others
        rest[np.argmax(rest)] -= 1
        excess -= 1
    counts[0] += max(0, -excess)
    return counts.tolist()


TASKS: dict[str, Task] = {t.name: t for t in (NiahMultikey(), VariableTracking(), FrequentWords())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {sorted(TASKS)}")
    return TASKS[name]
