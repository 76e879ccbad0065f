"""Packed next-token rows from a token file, one independent document stream per global batch row.

The documents are taken in a per-epoch shuffled order (grain's ``MapDataset.shuffle``: a new permutation each epoch,
seeded by ``seed + epoch``); epochs follow each other without a break. Row ``r`` of a batch of ``B`` rows reads the
documents at positions ``r, r + B, r + 2B, ...`` of that endless order and packs them continuously into rows of
``T + 1`` tokens: a document that does not fit continues in the row's next step (its positions continue too). So
step ``s``, row ``r`` is a function of ``(seed, B, r, s)`` alone, whichever process reads it.

Within a row, segment ids count the documents 1, 2, ...; a target counts only inside one document. Positions count
inside a document, so with ``max_position`` (the model's ``max_position_embeddings``) a longer document is an error.
"""
from __future__ import annotations

import os

import grain
import numpy as np

from m1jax.data.batch import DataError, rows_to_batch
from m1jax.data.rows import READ_OPTIONS, check_row, check_seed, check_seq_len
from m1jax.data.token_file import TokenFile


class _PackedRowIterator(grain.DatasetIterator):
    """Rows of ``width`` tokens packed from the parent's documents ([n] token arrays).

    State: ``{"doc": parent state before the current document, "offset": tokens of it already used}``.
    """

    def __init__(self, parent: grain.DatasetIterator, width: int):
        super().__init__(parent)
        self._width = width
        self._doc: np.ndarray | None = None
        self._doc_state = None
        self._offset = 0

    def _next_doc(self) -> None:
        self._doc_state = self._parent.get_state()
        self._doc = next(self._parent)
        self._offset = 0

    def __next__(self) -> dict[str, np.ndarray]:
        width = self._width
        tokens = np.zeros(width, np.int64)
        segments = np.zeros(width, np.int32)
        positions = np.zeros(width, np.int32)
        filled = segment = 0
        while filled < width:
            if self._doc is None:
                self._next_doc()
            take = min(width - filled, len(self._doc) - self._offset)
            if take > 0:
                segment += 1
                tokens[filled:filled + take] = self._doc[self._offset:self._offset + take]
                segments[filled:filled + take] = segment
                positions[filled:filled + take] = np.arange(self._offset, self._offset + take)
                filled += take
                self._offset += take
            if self._offset >= len(self._doc):
                self._doc = None
        return rows_to_batch(tokens, segments, positions)

    def get_state(self) -> dict:
        if self._doc is None:
            return {"doc": self._parent.get_state(), "offset": 0}
        return {"doc": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["doc"])
        self._doc = None
        if state["offset"]:
            self._next_doc()
            self._offset = int(state["offset"])


class _PackedRows(grain.IterDataset):
    def __init__(self, docs: grain.IterDataset, width: int):
        super().__init__(docs)
        self._width = width

    def __iter__(self) -> _PackedRowIterator:
        return _PackedRowIterator(self._parent.__iter__(), self._width)


class PackedTokenSource:
    """Packed rows of ``seq_len`` next-token pairs from a token file (see the module docstring).

    ``shuffle=False`` keeps the file's document order (epochs then repeat it). ``max_position``: the model's
    position table; ``seq_len`` and every document must fit in it (DataError naming the document otherwise).
    """

    def __init__(self, source: TokenFile | str | os.PathLike, seq_len: int, seed: int = 0, shuffle: bool = True,
                 max_position: int | None = None):
        self.file = source if isinstance(source, TokenFile) else TokenFile(source)
        if self.file.n_docs == 0 or self.file.header["n_tokens"] == 0:
            raise DataError(f"token file {self.file.prefix} holds no tokens")
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        check_seed(seed)
        check_seq_len(seq_len, max_position)
        self.seq_len, self.seed, self.shuffle, self.max_position = seq_len, seed, shuffle, max_position
        self.vocab_size = self.file.vocab_size

    def document(self, i: int) -> np.ndarray:
        """Document ``i`` of the file, checked (ids by the file; its length against ``max_position``)."""
        doc = self.file.doc(i)
        if self.max_position is not None and len(doc) > self.max_position:
            raise DataError(f"token file {self.file.prefix}: document {i} has {len(doc)} tokens, more than the "
                            f"model's max_position_embeddings {self.max_position} (positions count inside a "
                            f"document): split it")
        return doc

    def row_iterator(self, row: int, num_rows: int) -> grain.DatasetIterator:
        """Row ``row`` of every batch of ``num_rows`` rows: examples of ``[seq_len]`` arrays, one per step."""
        check_row(row, num_rows)
        docs = grain.MapDataset.range(self.file.n_docs)
        if self.shuffle:
            docs = docs.shuffle(seed=self.seed)
        docs = docs.repeat().slice(slice(row, None, num_rows)).map(self.document)
        return iter(_PackedRows(docs.to_iter_dataset(READ_OPTIONS), self.seq_len + 1))
