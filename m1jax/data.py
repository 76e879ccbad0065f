"""Input pipeline: packed next-token batches from pre-tokenised files, raw text through ``tokenizers``, and the
synthetic arithmetic tasks; every iterator is deterministic and checkpointable (its state is a small JSON dict).

A batch is a dict of ``[B, T]`` numpy arrays (see ``m1jax.train``): ``inputs``, ``targets``, ``loss_mask``,
``segment_ids`` (1, 2, ... per packed document in a row; 0 = padding), ``positions`` (position inside the document).

Token files (``write_token_file``): ``<prefix>.tokens`` is a flat little-endian array of token ids (uint16 when the
vocabulary fits, else uint32), read with ``np.memmap``; ``<prefix>.docs.npy`` holds int64 document boundaries
``[n_docs + 1]`` (document i is ``tokens[b[i]:b[i+1]]``); ``<prefix>.json`` records dtype and counts.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np

from m1jax.rl.tasks import ArithmeticTask, CharTokenizer, teacher_sft_batch


class DataError(ValueError):
    """A token file is missing, inconsistent or truncated."""


# ------------------------------------------------------------------------------------------------ token files
def write_token_file(prefix: str | os.PathLike, docs: Iterable[Iterable[int]], vocab_size: int) -> dict:
    """Write documents (token-id sequences) as ``<prefix>.tokens`` + ``.docs.npy`` + ``.json``; returns the header.

    Streams: one document in memory at a time.
    """
    prefix = os.fspath(prefix)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    bounds = [0]
    with open(prefix + ".tokens.tmp", "wb") as fh:
        for doc in docs:
            arr = np.asarray(list(doc), dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise DataError(f"document {len(bounds) - 1} has token ids outside [0, {vocab_size})")
            fh.write(arr.astype(dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes())
            bounds.append(bounds[-1] + arr.size)
    np.save(prefix + ".docs.tmp.npy", np.asarray(bounds, np.int64))
    header = {"dtype": np.dtype(dtype).name, "n_tokens": bounds[-1], "n_docs": len(bounds) - 1,
              "vocab_size": vocab_size}
    with open(prefix + ".json.tmp", "w") as fh:
        json.dump(header, fh)
    for suffix in (".tokens", ".docs.npy", ".json"):  # the header last: it marks the file set complete
        tmp = prefix + (".docs.tmp.npy" if suffix == ".docs.npy" else suffix + ".tmp")
        os.replace(tmp, prefix + suffix)
    return header


class TokenFile:
    """Read-only view of a token file set: ``tokens`` (memmap [n_tokens]) and ``bounds`` ([n_docs + 1])."""

    def __init__(self, prefix: str | os.PathLike):
        prefix = os.fspath(prefix)
        try:
            with open(prefix + ".json") as fh:
                self.header = json.load(fh)
            self.bounds = np.load(prefix + ".docs.npy")
        except FileNotFoundError as e:
            raise DataError(f"token file {prefix}: missing {e.filename}") from None
        dtype = np.dtype(self.header["dtype"]).newbyteorder("<")
        expected = self.header["n_tokens"] * dtype.itemsize
        size = os.path.getsize(prefix + ".tokens") if os.path.exists(prefix + ".tokens") else -1
        if size != expected:
            raise DataError(f"token file {prefix}.tokens has {size} bytes, expected {expected} (truncated?)")
        if self.bounds[0] != 0 or self.bounds[-1] != self.header["n_tokens"] or np.any(np.diff(self.bounds) < 0):
            raise DataError(f"token file {prefix}.docs.npy: boundaries do not cover [0, n_tokens] in order")
        self.tokens = np.memmap(prefix + ".tokens", dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
        self.vocab_size = int(self.header["vocab_size"])

    @property
    def n_docs(self) -> int:
        return len(self.bounds) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.bounds[i]:self.bounds[i + 1]]


# ------------------------------------------------------------------------------------------------ packing
def rows_to_batch(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of ``T + 1`` packed tokens -> a next-token batch of ``[B, T]`` arrays.

    A target counts only inside the same document (no predicting the next document's first token from the end of
    this one) and never on padding (segment 0).
    """
    seg_in, seg_out = segment_ids[:, :-1], segment_ids[:, 1:]
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": (seg_in == seg_out) & (seg_out != 0), "segment_ids": seg_in.astype(np.int32),
            "positions": positions[:, :-1].astype(np.int32)}


class PackedTokenIterator:
    """Batches of ``[batch, seq_len]`` from a TokenFile: documents in a per-epoch shuffled order (seeded by
    ``(seed, epoch)``), concatenated and cut into rows of ``seq_len + 1`` tokens; a document that does not fit is
    continued in the next row (its positions continue too). Rows carry segment ids 1, 2, ... per document.

    ``state()`` = {"epoch", "doc", "offset", "seed"}: the next token is ``offset`` into the ``doc``-th document of
    epoch ``epoch``'s order. ``restore(state)`` resumes exactly there.
    """

    def __init__(self, source: TokenFile, batch: int, seq_len: int, seed: int = 0, shuffle: bool = True):
        if source.n_docs == 0 or source.header["n_tokens"] == 0:
            raise DataError("token file holds no tokens")
        self.source, self.batch, self.seq_len, self.shuffle = source, batch, seq_len, shuffle
        self.seed, self.epoch, self.doc, self.offset = seed, 0, 0, 0
        self._order_epoch, self._order = None, None

    def state(self) -> dict:
        return {"epoch": self.epoch, "doc": self.doc, "offset": self.offset, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"data iterator state has seed {state['seed']}, this iterator {self.seed}")
        self.epoch, self.doc, self.offset = int(state["epoch"]), int(state["doc"]), int(state["offset"])

    def _order_for(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.source.n_docs
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = epoch
        return self._order

    def _row(self):
        width = self.seq_len + 1
        tokens = np.zeros(width, np.int64)
        segs = np.zeros(width, np.int32)
        pos = np.zeros(width, np.int32)
        filled, segment = 0, 0
        while filled < width:
            order = self._order_for(self.epoch)
            doc = self.source.doc(int(order[self.doc]))
            take = min(width - filled, len(doc) - self.offset)
            if take > 0:
                segment += 1
                tokens[filled:filled + take] = doc[self.offset:self.offset + take]
                segs[filled:filled + take] = segment
                pos[filled:filled + take] = np.arange(self.offset, self.offset + take)
                filled += take
                self.offset += take
            if self.offset >= len(doc):
                self.doc, self.offset = self.doc + 1, 0
                if self.doc == len(order):
                    self.epoch, self.doc = self.epoch + 1, 0
        return tokens, segs, pos

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self._row() for _ in range(self.batch)]
        return rows_to_batch(*(np.stack(parts) for parts in zip(*rows)))


# ------------------------------------------------------------------------------------------------ raw text
def tokenize_to_file(tokenizer_json: str | os.PathLike, texts: Iterable[str], prefix: str | os.PathLike, *,
                     eos_token: str | None = None, batch_size: int = 256) -> dict:
    """Tokenise raw documents with a ``tokenizers`` tokenizer.json (as MiniMax ships one) into a token file.

    ``eos_token`` (e.g. "<end_of_document>"), when given, is appended to every document so the model learns where
    documents end. Returns the token file header.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.fspath(tokenizer_json))
    eos = None
    if eos_token is not None:
        eos = tok.token_to_id(eos_token)
        if eos is None:
            raise DataError(f"{tokenizer_json}: no token {eos_token!r} in the vocabulary")

    def docs():
        pending: list[str] = []
        for text in texts:
            pending.append(text)
            if len(pending) == batch_size:
                yield from encode(pending)
                pending = []
        if pending:
            yield from encode(pending)

    def encode(batch):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            yield enc.ids + ([eos] if eos is not None else [])

    return write_token_file(prefix, docs(), tok.get_vocab_size(with_added_tokens=True))


def read_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Documents from files: ``.jsonl`` (one {"text": ...} per line) or any other file as one document."""
    for path in paths:
        path = os.fspath(path)
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        record = json.loads(line)
                        if "text" not in record:
                            raise DataError(f"{path}:{line_no}: record has no 'text' field")
                        yield record["text"]
        else:
            with open(path, encoding="utf-8") as fh:
                yield fh.read()


# ------------------------------------------------------------------------------------------------ synthetic
class ArithmeticIterator:
    """Teacher SFT batches of the arithmetic task (m1jax.rl.tasks): BOS prompt answer EOS, loss on the answer.

    Batch i is drawn from ``np.random.default_rng([seed, i])``, so ``state()`` = {"step", "seed"} restores exactly.
    ``seq_len`` defaults to the task's longest sequence minus one.
    """

    def __init__(self, task: ArithmeticTask, batch: int, seq_len: int | None = None, seed: int = 0):
        self.task, self.batch, self.seed, self.step = task, batch, seed, 0
        self.tokenizer = CharTokenizer()
        longest = task.max_prompt_tokens + task.max_answer_tokens
        self.seq_len = longest - 1 if seq_len is None else seq_len
        if self.seq_len + 1 < longest:
            raise DataError(f"seq_len {self.seq_len} is shorter than the task's longest sequence {longest} - 1")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def state(self) -> dict:
        return {"step": self.step, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"data iterator state has seed {state['seed']}, this iterator {self.seed}")
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.step])
        self.step += 1
        tokens, target_mask = teacher_sft_batch(self.task, self.tokenizer, rng, self.batch, self.seq_len + 1)
        segs = (tokens != self.tokenizer.PAD).astype(np.int32)
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        batch = rows_to_batch(tokens, segs, positions)
        batch["loss_mask"] = target_mask[:, 1:]  # train on the answer and EOS only
        return batch


def make_iterator(spec: str, batch: int, seq_len: int | None, seed: int = 0):
    """``synthetic:add`` / ``synthetic:mul`` (arithmetic tasks) or a token-file prefix."""
    if spec.startswith("synthetic:"):
        op = {"add": "+", "mul": "*"}.get(spec.split(":", 1)[1])
        if op is None:
            raise DataError(f"unknown synthetic task {spec!r}; use synthetic:add or synthetic:mul")
        return ArithmeticIterator(ArithmeticTask(op=op), batch, seq_len, seed)
    if seq_len is None:
        raise DataError("a token file needs --seq_len")
    return PackedTokenIterator(TokenFile(spec), batch, seq_len, seed)
