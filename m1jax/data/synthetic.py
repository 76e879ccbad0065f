"""Synthetic supervised rows: the arithmetic task's teacher answers (m1jax.rl.tasks), for demos and tests.

A row is BOS prompt answer EOS, right-padded, with the loss on the answer and EOS only. Row ``r`` of step ``s`` is
drawn from ``np.random.default_rng([seed, s, r])``: a function of ``(seed, s, r)``, whichever process draws it and
however large the batch.
"""
from __future__ import annotations

import grain
import numpy as np

from m1jax.data.batch import DataError, check_token_ids, rows_to_batch
from m1jax.data.rows import READ_OPTIONS, check_row, check_seed, check_seq_len
from m1jax.rl.tasks import ArithmeticTask, CharTokenizer, teacher_sft_batch

SYNTHETIC_TASKS = {"add": "+", "mul": "*"}
_ENDLESS = 2**62  # steps of a synthetic stream (grain datasets have a length)


class ArithmeticSource:
    """Teacher SFT rows of an ``ArithmeticTask``; ``seq_len`` defaults to the task's longest sequence minus one.
    ``max_position``: the model's position table, which ``seq_len`` must fit."""

    def __init__(self, task: ArithmeticTask, seq_len: int | None = None, seed: int = 0,
                 max_position: int | None = None):
        check_seed(seed)
        self.task, self.seed = task, seed
        self.tokenizer = CharTokenizer()
        longest = task.max_prompt_tokens + task.max_answer_tokens
        self.seq_len = longest - 1 if seq_len is None else seq_len
        if self.seq_len + 1 < longest:
            raise DataError(f"seq_len {self.seq_len} is shorter than the task's longest sequence {longest} - 1")
        check_seq_len(self.seq_len, max_position)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def example(self, step: int, row: int) -> dict[str, np.ndarray]:
        """Row ``row`` of step ``step``: a dict of ``[seq_len]`` arrays."""
        rng = np.random.default_rng([self.seed, step, row])
        tokens, target_mask = teacher_sft_batch(self.task, self.tokenizer, rng, 1, self.seq_len + 1)
        tokens, target_mask = tokens[0], target_mask[0]
        check_token_ids(tokens, self.vocab_size, f"synthetic task {self.task.op!r}: row {row} of step {step}")
        example = rows_to_batch(tokens, (tokens != self.tokenizer.PAD).astype(np.int32),
                                np.arange(len(tokens), dtype=np.int32))
        example["loss_mask"] = target_mask[1:]  # train on the answer and EOS only
        return example

    def row_iterator(self, row: int, num_rows: int) -> grain.DatasetIterator:
        check_row(row, num_rows)
        steps = grain.MapDataset.range(_ENDLESS).map(lambda step: self.example(step, row))
        return iter(steps.to_iter_dataset(READ_OPTIONS))


def arithmetic_source(name: str, seq_len: int | None = None, seed: int = 0,
                      max_position: int | None = None) -> ArithmeticSource:
    """``add`` or ``mul``."""
    if name not in SYNTHETIC_TASKS:
        raise DataError(f"unknown synthetic task {name!r}; use one of {['synthetic:' + n for n in SYNTHETIC_TASKS]}")
    return ArithmeticSource(ArithmeticTask(op=SYNTHETIC_TASKS[name]), seq_len, seed, max_position)
