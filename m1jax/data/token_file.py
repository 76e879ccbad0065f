"""Pre-tokenised corpora on disk: one flat token array plus document boundaries, memory-mapped for reading.

``<prefix>.tokens`` is a flat little-endian array of token ids (uint16 when the vocabulary fits, else uint32);
``<prefix>.docs.npy`` holds int64 document boundaries ``[n_docs + 1]`` (document i is ``tokens[b[i]:b[i+1]]``);
``<prefix>.json`` records dtype and counts and is written last, so its presence marks a complete file set.

Every document is checked when it is read: its ids must lie in ``[0, vocab_size)`` of the header (a header that
understates the vocabulary, or ids written by another tool, fail there with the file, document and id named).
"""
from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from m1jax.data.batch import DataError, check_token_ids

TOKEN_DTYPES = ("uint16", "uint32")


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
            fh.write(arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
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
        self.prefix = prefix
        try:
            with open(prefix + ".json") as fh:
                self.header = json.load(fh)
            self.bounds = np.load(prefix + ".docs.npy")
        except FileNotFoundError as e:
            raise DataError(f"token file {prefix}: missing {e.filename}") from None
        if self.header.get("dtype") not in TOKEN_DTYPES:
            raise DataError(f"token file {prefix}.json: dtype {self.header.get('dtype')!r}; token ids are stored as "
                            f"one of {TOKEN_DTYPES}")
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
        """Document ``i``'s token ids (checked against the header's vocabulary)."""
        tokens = self.tokens[self.bounds[i]:self.bounds[i + 1]]
        check_token_ids(tokens, self.vocab_size, f"token file {self.prefix}: document {i}")
        return tokens
