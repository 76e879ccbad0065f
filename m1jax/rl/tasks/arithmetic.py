"""Program-verified arithmetic tasks for the CISPO reproduction (docs/rl.md), generated on the fly.

Two tasks share one column-arithmetic core (`ArithmeticTask(op=...)`):
  op="+"  noisy-carry addition: `a+b=` with a, b uniform K-digit integers
  op="*"  K-digit x 1-digit multiplication: `a*b=` with b in 2..9 (carries up to 8: richer forks)
K is drawn uniformly from [min_digits, max_digits] per problem. The answer is the result written least-significant
digit first, then EOS. Reward: 1 for an exact answer; `format_reward` (default 0, TinyZero uses 0.1) for a well-formed
answer (digits then EOS) of the right length; 0 otherwise, including a completion with no EOS (truncated).

The imperfect teacher writes every digit correctly except at positions with an incoming carry, where it forgets the
carry with probability `forget_prob`: it writes the column's digit without the carry (for addition: one lower), and
at the final position, whose digit is the carry itself, it writes nothing (a leading zero is never written). Its carry
state stays correct, so errors are local. P(teacher correct) = (1 - forget_prob) ** (#carry-in positions).

Everything is numpy/python and deterministic given a `numpy.random.Generator`. `ArithmeticTask` implements the RL
learner's task interface (`m1jax.rl.task.Task`) with the character vocabulary of `CharTokenizer`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from m1jax.rl.task import Task


class CharTokenizer:
    """Character vocabulary: PAD=0, BOS=1, EOS=2, then the digits 0-9 and the operator characters `+*=`."""

    PAD, BOS, EOS = 0, 1, 2
    _SPECIALS = 3

    def __init__(self, chars: str = "0123456789+*="):
        self.chars = chars
        self._ids = {c: i + self._SPECIALS for i, c in enumerate(chars)}
        self.digit_ids = np.array([self._ids[d] for d in "0123456789"])

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + self._SPECIALS

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary {self.chars!r}") from None

    def decode(self, ids) -> str:
        """Characters of ids, stopping at the first EOS; PAD and BOS are dropped."""
        out = []
        for i in np.asarray(ids).tolist():
            if i == self.EOS:
                break
            if i >= self._SPECIALS:
                out.append(self.chars[i - self._SPECIALS])
        return "".join(out)


_TOKENIZER = CharTokenizer()


@dataclasses.dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> str:
        """The exact result, least-significant digit first."""
        value = self.a + self.b if self.op == "+" else self.a * self.b
        return str(value)[::-1]


@dataclasses.dataclass(frozen=True)
class ArithmeticTask(Task):
    op: str = "+"
    min_digits: int = 3
    max_digits: int = 8
    forget_prob: float = 0.6
    format_reward: float = 0.0

    def __post_init__(self):
        if self.op not in ("+", "*"):
            raise ValueError(f"op must be '+' or '*', got {self.op!r}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not 0.0 <= self.forget_prob <= 1.0:
            raise ValueError(f"forget_prob must be in [0, 1], got {self.forget_prob}")

    @property
    def max_prompt_tokens(self) -> int:
        """BOS + the longest prompt."""
        second = self.max_digits if self.op == "+" else 1
        return 1 + self.max_digits + 1 + second + 1

    @property
    def max_answer_tokens(self) -> int:
        """The longest answer (max_digits + 1 digits) + EOS: the rollout's max_new_tokens."""
        return self.max_digits + 2

    # The learner's task interface (m1jax.rl.task.Task), in CharTokenizer's vocabulary.
    pad_id = CharTokenizer.PAD
    stop_ids = (CharTokenizer.EOS,)

    @property
    def max_new_tokens(self) -> int:
        return self.max_answer_tokens

    @property
    def vocab_size(self) -> int:
        return _TOKENIZER.vocab_size

    def prompt(self, problem: Problem) -> list[int]:
        """BOS + the prompt's characters."""
        return [CharTokenizer.BOS] + _TOKENIZER.encode(problem.prompt)

    def eval_subsets(self, problems) -> dict[str, np.ndarray]:
        """``carry``: the problems whose exact answer has a carry (the ones with fork tokens)."""
        return {"carry": np.array([self.carry_in(p).any() for p in problems], bool)}

    def sft_batch(self, rng: np.random.Generator, n: int):
        return teacher_sft_batch(self, _TOKENIZER, rng, n)

    def sample(self, rng: np.random.Generator, n: int) -> list[Problem]:
        digits = rng.integers(self.min_digits, self.max_digits + 1, size=n)
        problems = []
        for k in digits.tolist():
            a = int(rng.integers(10 ** (k - 1), 10 ** k))
            b = int(rng.integers(10 ** (k - 1), 10 ** k)) if self.op == "+" else int(rng.integers(2, 10))
            problems.append(Problem(a, b, self.op))
        return problems

    def teacher_answer(self, problem: Problem, rng: np.random.Generator) -> str:
        """The imperfect teacher's answer (LSD first); `rng` is drawn once per carry-in position."""
        return "".join(str(d) for d, _ in self._written_digits(problem, rng))

    def carry_in(self, problem: Problem) -> np.ndarray:
        """[len(answer)] bool: answer positions with an incoming carry (the fork positions)."""
        return np.array([carry for _, carry in self._written_digits(problem, None)], bool)

    def reward(self, problem: Problem, completion, tokenizer: CharTokenizer | None = None) -> float:
        """Reward of one completion: token ids [T] that follow the prompt (EOS-terminated, then anything)."""
        return answer_reward(problem.answer, completion, self.format_reward, tokenizer)

    def _written_digits(self, problem: Problem, rng: np.random.Generator | None):
        """(digit, had_carry_in) per written position, LSD first. rng=None writes the exact answer."""
        a_digits = [int(c) for c in str(problem.a)[::-1]]
        b_digits = [int(c) for c in str(problem.b)[::-1]]
        if self.op == "+":
            width = max(len(a_digits), len(b_digits))
            pad = lambda ds: ds + [0] * (width - len(ds))  # noqa: E731
            columns = [x + y for x, y in zip(pad(a_digits), pad(b_digits))]
        else:
            columns = [x * problem.b for x in a_digits]
        out, carry = [], 0
        for column in columns:
            total = column + carry
            forgot = carry > 0 and rng is not None and rng.random() < self.forget_prob
            out.append(((column if forgot else total) % 10, carry > 0))
            carry = total // 10
        # The final carry is a digit of its own (carry <= 8 here); forgetting it means writing nothing.
        if carry and not (rng is not None and rng.random() < self.forget_prob):
            out.append((carry, True))
        if rng is None and "".join(str(d) for d, _ in out) != problem.answer:
            raise AssertionError(f"column arithmetic disagrees with the exact answer for {problem}")
        return out


def answer_reward(answer: str, completion, format_reward: float = 0.0, tokenizer: CharTokenizer | None = None) -> float:
    """1 if ``completion`` (token ids [T]) is ``answer``'s digits then EOS (anything after EOS is ignored);
    ``format_reward`` for digits then EOS of the right length; 0 otherwise, a completion with no EOS included."""
    tokenizer = _TOKENIZER if tokenizer is None else tokenizer
    ids = np.asarray(completion).tolist()
    if tokenizer.EOS not in ids:
        return 0.0
    body = ids[:ids.index(tokenizer.EOS)]
    if not body or not all(i in tokenizer.digit_ids for i in body):
        return 0.0
    text = tokenizer.decode(body)
    if text == answer:
        return 1.0
    return format_reward if len(text) == len(answer) else 0.0


def pad_sequences(seqs, length: int | None = None, pad_id: int = CharTokenizer.PAD, side: str = "right"):
    """Stack token lists into [n, length] int32, padded on `side` ("left" or "right"); also return lengths [n]."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    lengths = np.array([len(s) for s in seqs], np.int32)
    length = int(lengths.max()) if length is None else length
    if lengths.max() > length:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit length {length}")
    out = np.full((len(seqs), length), pad_id, np.int32)
    for row, s in zip(out, seqs):
        start = length - len(s) if side == "left" else 0
        row[start:start + len(s)] = s
    return out, lengths


def encode_prompts(problems, tokenizer: CharTokenizer, length: int | None = None, side: str = "left"):
    """Rollout prompts: BOS + prompt, padded to [n, length] int32 (left by default, so all prompts end together).

    Returns (tokens [n, length], lengths [n]).
    """
    return pad_sequences([[tokenizer.BOS] + tokenizer.encode(p.prompt) for p in problems], length,
                         tokenizer.PAD, side)


def teacher_sft_batch(task: ArithmeticTask, tokenizer: CharTokenizer, rng: np.random.Generator, n: int,
                      length: int | None = None):
    """Supervised pairs from the imperfect teacher: BOS prompt answer EOS, right-padded.

    Returns (tokens [n, length] int32, target_mask [n, length] bool). target_mask marks the answer tokens and EOS in
    `tokens`, i.e. the positions whose token the model is trained to predict (from the logits one step earlier).
    length defaults to task.max_prompt_tokens + task.max_answer_tokens.
    """
    length = task.max_prompt_tokens + task.max_answer_tokens if length is None else length
    seqs, starts = [], []
    for problem in task.sample(rng, n):
        prompt = [tokenizer.BOS] + tokenizer.encode(problem.prompt)
        seqs.append(prompt + tokenizer.encode(task.teacher_answer(problem, rng)) + [tokenizer.EOS])
        starts.append(len(prompt))
    tokens, lengths = pad_sequences(seqs, length, tokenizer.PAD, "right")
    positions = np.arange(length)[None, :]
    target_mask = (positions >= np.array(starts)[:, None]) & (positions < lengths[:, None])
    return tokens, target_mask


def batch_rewards(task: ArithmeticTask, problems, completions, tokenizer: CharTokenizer) -> np.ndarray:
    """Rewards [n] float32 for completions [n, T] (token ids after each prompt)."""
    completions = np.asarray(completions)
    if completions.ndim != 2 or completions.shape[0] != len(problems):
        raise ValueError(f"completions must be [{len(problems)}, T], got shape {completions.shape}")
    return np.array([task.reward(p, c, tokenizer) for p, c in zip(problems, completions)], np.float32)
