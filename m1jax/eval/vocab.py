"""The words long-context prompts are made of: token ids for tokenizer-less models, or text.

A task writes its prompt as a sequence of *words*: fixed phrases (``phrase``: the instructions, the noise sentences)
and content words drawn at random (``draw``: keys, values, variable names, coded words). The vocabulary turns words
into a prompt and counts its tokens:

* ``IdVocabulary(vocab_size)``: each word is one token id (its decimal string). Phrase words map to ids below
  ``reserved`` (by a hash: the same word is always the same id), content words to distinct ids from ``reserved`` up.
  A prompt is the ids joined by spaces: what the server takes as a text prompt from a model without a tokenizer,
  and ``[int(w) for w in words]`` for the library.
* ``TextVocabulary(count_tokens)``: words are text; content words are pronounceable pseudo-words and 7-digit numbers
  (or drawn from ``pool``), prompts are the words joined by spaces, and ``count_tokens`` (a tokenizer's encode
  length) measures them (without it: about four characters a token).

``split`` cuts a model's answer into words for scoring (whole-word matching, so answer 12 is not found in 123).
"""
from __future__ import annotations

import abc
import re
import zlib
from typing import Callable, Sequence

import numpy as np


class Vocabulary(abc.ABC):
    @abc.abstractmethod
    def phrase(self, text: str) -> list[str]:
        """The words of a fixed phrase."""

    @abc.abstractmethod
    def draw(self, rng: np.random.Generator, n: int, kind: str = "word", exclude: Sequence[str] = ()) -> list[str]:
        """``n`` distinct content words not in ``exclude`` (``kind``: "word" or "number"; an id vocabulary has only
        ids)."""

    def join(self, words: Sequence[str]) -> str:
        return " ".join(words)

    @abc.abstractmethod
    def count(self, words: Sequence[str]) -> int:
        """Tokens the words take as a prompt."""

    @abc.abstractmethod
    def split(self, text: str) -> list[str]:
        """The words of a model's answer."""


class IdVocabulary(Vocabulary):
    """Words are token ids (see the module docstring)."""

    def __init__(self, vocab_size: int, reserved: int | None = None):
        self.vocab_size = int(vocab_size)
        self.reserved = int(reserved if reserved is not None else min(32, self.vocab_size // 4))
        if not 2 <= self.reserved < self.vocab_size - 1:
            raise ValueError(f"reserved={self.reserved} must be in [2, vocab_size - 1) for vocab_size={vocab_size}")

    def phrase(self, text: str) -> list[str]:
        # id 0 is left out (often the padding id)
        return [str(1 + zlib.crc32(w.encode()) % (self.reserved - 1)) for w in text.split()]

    def draw(self, rng: np.random.Generator, n: int, kind: str = "word", exclude: Sequence[str] = ()) -> list[str]:
        taken = set(exclude)
        pool = [str(i) for i in range(self.reserved, self.vocab_size) if str(i) not in taken]
        return _choose(rng, pool, n, f"the vocabulary (vocab_size {self.vocab_size}, {self.reserved} reserved)")

    def count(self, words: Sequence[str]) -> int:
        return len(words)

    def split(self, text: str) -> list[str]:
        return text.split()

    def ids(self, words: Sequence[str]) -> list[int]:
        return [int(w) for w in words]


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class TextVocabulary(Vocabulary):
    """Words are text (see the module docstring)."""

    def __init__(self, count_tokens: Callable[[str], int] | None = None, pool: Sequence[str] | None = None):
        self.count_tokens = count_tokens
        self.pool = None if pool is None else list(dict.fromkeys(pool))

    def phrase(self, text: str) -> list[str]:
        return text.split()

    def draw(self, rng: np.random.Generator, n: int, kind: str = "word", exclude: Sequence[str] = ()) -> list[str]:
        taken = set(exclude)
        if self.pool is not None:
            return _choose(rng, [w for w in self.pool if w not in taken], n, "the word pool")
        out: dict[str, None] = {}
        while len(out) < n:
            if kind == "number":
                word = str(int(rng.integers(1_000_000, 10_000_000)))
            else:
                syllables = rng.integers(0, len(_CONSONANTS) * len(_VOWELS), 3)
                word = "".join(_CONSONANTS[s // len(_VOWELS)] + _VOWELS[s % len(_VOWELS)] for s in syllables)
            if word not in taken:
                out[word] = None
        return list(out)

    def count(self, words: Sequence[str]) -> int:
        text = self.join(words)
        return self.count_tokens(text) if self.count_tokens is not None else -(-len(text) // 4)

    def split(self, text: str) -> list[str]:
        return re.findall(r"[A-Za-z0-9_]+", text)


def _choose(rng: np.random.Generator, pool: list[str], n: int, what: str) -> list[str]:
    if n > len(pool):
        raise ValueError(f"{n} distinct content words asked for, {what} has {len(pool)} left")
    return [pool[int(i)] for i in rng.choice(len(pool), n, replace=False)]
