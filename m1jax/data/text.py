"""Raw text -> token files: documents from JSONL or plain files, tokenised with a ``tokenizers`` tokenizer.json."""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from m1jax.data.batch import DataError
from m1jax.data.token_file import write_token_file


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

    def encode(batch):
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            yield enc.ids + ([eos] if eos is not None else [])

    def docs():
        pending: list[str] = []
        for text in texts:
            pending.append(text)
            if len(pending) == batch_size:
                yield from encode(pending)
                pending = []
        if pending:
            yield from encode(pending)

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
