"""What every row source shares: grain's read options, and the checks on a row stream's arguments.

A row source (``PackedTokenSource``, ``ArithmeticSource``) gives, for global row ``r`` of a batch of ``B`` rows, a
grain ``DatasetIterator`` of that row's examples (dicts of ``[T]`` arrays, ``m1jax.data.batch``), one per step, whose
``get_state``/``set_state`` capture exactly where the stream is. Row streams depend on ``(seed, r, B)`` only, never on
which process reads them, so any number of processes assemble the same global batches.
"""
from __future__ import annotations

import grain

from m1jax.data.batch import DataError

# Reading happens in the calling thread: one row stream per local row, so grain's default thread pool per iterator
# (16 threads, 500 prefetched elements) would multiply by the batch size; a row is a memmap slice or a few numbers.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

MAX_SEED = 2**32 - 1  # grain's shuffle seeds are uint32


def check_row(row: int, num_rows: int) -> None:
    if not 0 <= row < num_rows:
        raise DataError(f"row {row} is outside a batch of {num_rows} rows")


def check_seq_len(seq_len: int, max_position: int | None) -> None:
    """A row's positions run up to ``seq_len - 1``: they must fit the model's position table."""
    if max_position is not None and seq_len > max_position:
        raise DataError(f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_position}")


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise DataError(f"data seed must be in [0, {MAX_SEED}], got {seed}")
