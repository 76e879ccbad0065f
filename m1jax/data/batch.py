"""The batch format every loader produces and the train step consumes.

A batch is a dict of ``[B, T]`` arrays: ``inputs`` (int32), ``targets`` (int32, the next token), ``loss_mask``
(bool: which targets count), ``segment_ids`` (int32: 1, 2, ... per packed document in a row, 0 = padding) and
``positions`` (int32: position inside the document). A single row is the same dict of ``[T]`` arrays.
"""
from __future__ import annotations

import numpy as np

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


class DataError(ValueError):
    """A data source is missing, inconsistent, truncated or does not fit the requested batch or model."""


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """DataError naming ``where``, the first offending id and its position unless every id is in [0, vocab_size).

    Ids are checked where they enter (a document read from a token file, a synthetic row): past that point they are
    cast to int32 and used as embedding indices, where an id past the table reads garbage (NaN losses) and a negative
    one wraps around to the end of the table.
    """
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        position = int(np.flatnonzero((tokens < 0) | (tokens >= vocab_size))[0])
        raise DataError(f"{where} holds token id {int(tokens.flat[position])} at position {position}, outside the "
                        f"vocabulary [0, {vocab_size})")


def rows_to_batch(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Packed tokens ``[..., T + 1]`` (one row or a stack of rows) -> the next-token arrays ``[..., T]``.

    A target counts only inside the same document (the end of one document does not predict the next document's
    first token) and never on padding (segment 0).
    """
    seg_in, seg_out = segment_ids[..., :-1], segment_ids[..., 1:]
    return {"inputs": tokens[..., :-1].astype(np.int32), "targets": tokens[..., 1:].astype(np.int32),
            "loss_mask": (seg_in == seg_out) & (seg_out != 0), "segment_ids": seg_in.astype(np.int32),
            "positions": positions[..., :-1].astype(np.int32)}
