"""Column addition with a noisy-carry teacher: the task of the second CISPO reproduction (docs/rl.md).

Problem: ``operands`` integers (2 to 9), each uniform with K digits, K drawn per problem from [min_digits,
max_digits]. The prompt writes every operand least-significant digit first, zero-padded to ``max_digits``, joined
by ``+`` and ended by ``=``: 159 + 263 with max_digits 4 is ``BOS 9510+3620=``. Column j of every operand then sits
at the same distance before answer position j whatever K is, so a small model learns the column sums quickly and
the pretrained policy's errors are the teacher's, not its own. The answer is the sum, least-significant digit first
(nothing after its last digit), then EOS. Reward: 1 for the exact answer, ``format_reward`` (default 0) for digits
then EOS of the right length, 0 otherwise (a completion without EOS included).

The imperfect teacher (pretraining data) writes every digit exactly except where a carry comes in: there it forgets
the carry with probability ``forget_prob``, writing the column's digit without it (for the final position, whose
digit is the carry itself, it writes nothing). Its carry state stays correct, so its errors are local. The positions
with an incoming carry are the task's decision points (``decision_mask``): a model fitted to the teacher puts about
1 - forget_prob on the correct digit there and about 1 elsewhere, and the reward needs every one of them right.

Why this task: with two operands a K-digit problem has about 0.45 K + 0.45 carries, so K in 3..8 spreads the number
of forks per answer from 0 to 9 (mean about 2.8) and the teacher's accuracy (1 - forget_prob) ** #carries from 1 down
to almost 0 (mean 0.12 at forget_prob 0.7): a long tail of hard problems that keeps groups mixed while RL raises the
probability of the rare correct digits. Three operands carry up to 2 into almost every column.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

from m1jax.rl.task import Task
from m1jax.rl.tasks.arithmetic import CharTokenizer, answer_reward, teacher_sft_batch

_TOKENIZER = CharTokenizer()


@dataclasses.dataclass(frozen=True)
class ColumnSum:
    """A problem: the operands (all with the same number of digits) and the width W of the prompt's columns."""
    operands: tuple[int, ...]
    width: int

    @property
    def digits(self) -> int:
        """K, the operands' number of digits."""
        return len(str(self.operands[0]))

    @property
    def prompt(self) -> str:
        """Each operand LSD first, zero-padded to W, joined by '+', then '='."""
        return "+".join(str(x)[::-1].ljust(self.width, "0") for x in self.operands) + "="

    @property
    def answer(self) -> str:
        """The exact sum, least-significant digit first."""
        return str(sum(self.operands))[::-1]


@dataclasses.dataclass(frozen=True)
class ColumnAdditionTask(Task):
    operands: int = 2
    min_digits: int = 3
    max_digits: int = 8
    forget_prob: float = 0.7
    format_reward: float = 0.0

    def __post_init__(self):
        if not 2 <= self.operands <= 9:
            raise ValueError(f"operands must be in 2..9 (the final carry is one digit), got {self.operands}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if not 0.0 <= self.forget_prob <= 1.0:
            raise ValueError(f"forget_prob must be in [0, 1], got {self.forget_prob}")

    # The learner's task interface (m1jax.rl.task.Task), in CharTokenizer's vocabulary.
    pad_id = CharTokenizer.PAD
    stop_ids = (CharTokenizer.EOS,)

    @property
    def max_prompt_tokens(self) -> int:
        """BOS + operands x (W digits + one '+' or '=')."""
        return 1 + self.operands * (self.max_digits + 1)

    @property
    def max_answer_tokens(self) -> int:
        """The longest answer (W + 1 digits) + EOS."""
        return self.max_digits + 2

    @property
    def max_new_tokens(self) -> int:
        return self.max_answer_tokens

    @property
    def vocab_size(self) -> int:
        return _TOKENIZER.vocab_size

    def sample(self, rng: np.random.Generator, n: int) -> list[ColumnSum]:
        digits = rng.integers(self.min_digits, self.max_digits + 1, size=n)
        return [ColumnSum(tuple(int(x) for x in rng.integers(10 ** (k - 1), 10 ** k, size=self.operands)),
                          self.max_digits) for k in digits.tolist()]

    def prompt(self, problem: ColumnSum) -> list[int]:
        return [CharTokenizer.BOS] + _TOKENIZER.encode(problem.prompt)

    def reward(self, problem: ColumnSum, completion) -> float:
        return answer_reward(problem.answer, completion, self.format_reward)

    def decision_mask(self, problem: ColumnSum, completion) -> np.ndarray:
        """[N] bool: the answer positions with an incoming carry, up to the completion's EOS (included: writing EOS
        where the final carry digit belongs is the wrong branch of that fork)."""
        completion = np.asarray(completion)
        out = np.zeros(completion.shape[0], bool)
        carry = self.carry_in(problem)[:len(out)]
        out[:len(carry)] = carry
        stops = np.flatnonzero(completion == CharTokenizer.EOS)
        if stops.size:
            out[stops[0] + 1:] = False
        return out

    def reference_completion(self, problem: ColumnSum) -> list[int]:
        return _TOKENIZER.encode(problem.answer) + [CharTokenizer.EOS]

    def eval_subsets(self, problems) -> dict[str, np.ndarray]:
        """``long``: problems with more than (min_digits + max_digits) / 2 digits (the ones with the most forks)."""
        return {"long": np.array([2 * p.digits > self.min_digits + self.max_digits for p in problems], bool)}

    def sft_batch(self, rng: np.random.Generator, n: int):
        return teacher_sft_batch(self, _TOKENIZER, rng, n)

    def teacher_answer(self, problem: ColumnSum, rng: np.random.Generator) -> str:
        """The imperfect teacher's answer (LSD first); ``rng`` is drawn once per carry-in position."""
        return "".join(str(d) for d, _ in self._written_digits(problem, rng))

    def carry_in(self, problem: ColumnSum) -> np.ndarray:
        """[len(answer)] bool: answer positions with an incoming carry (the decision points)."""
        return np.array(_exact_carries(self, problem), bool)

    def _written_digits(self, problem: ColumnSum, rng: np.random.Generator | None):
        """(digit, had_carry_in) per written position, LSD first. rng=None writes the exact answer."""
        columns = [sum(int(c) for c in column) for column in zip(*(str(x)[::-1] for x in problem.operands))]
        out, carry = [], 0
        for column in columns:
            forgot = carry > 0 and rng is not None and rng.random() < self.forget_prob
            out.append(((column if forgot else column + carry) % 10, carry > 0))
            carry = (column + carry) // 10
        # The final carry (< operands <= 9) is a digit of its own; forgetting it means writing nothing.
        if carry and not (rng is not None and rng.random() < self.forget_prob):
            out.append((carry, True))
        if rng is None and "".join(str(d) for d, _ in out) != problem.answer:
            raise AssertionError(f"column arithmetic disagrees with the exact answer for {problem}")
        return out


@functools.lru_cache(maxsize=1 << 16)
def _exact_carries(task: ColumnAdditionTask, problem: ColumnSum) -> tuple[bool, ...]:
    """Cached: the G responses of a group, and every evaluation sample, share their problem's carries."""
    return tuple(carry for _, carry in task._written_digits(problem, None))
