"""Text in and out of a served model: the tokenizer (or token ids as text), streamed detokenization, stop strings.

Two kinds of ``TokenText``:

* ``TokenIdText`` (no tokenizer, e.g. the tiny presets): a text prompt is whitespace-separated token ids and
  generated text is the ids joined by spaces, as ``experiments.generate`` prints them.
* ``TokenizerText``: a checkpoint's ``tokenizer.json`` through the ``tokenizers`` package, with the special tokens,
  end-of-sequence ids and chat template of its ``tokenizer_config.json`` (``load_tokenizer``).

``IncrementalDecoder`` turns a stream of token ids into text deltas whose concatenation is the decoded text (a token
that ends inside a multi-byte character waits for the next one). ``StopStrings`` holds back text that could be the
start of a stop string, so a stream never shows part of the stop string it ends at.
"""
from __future__ import annotations

import abc
import json
import os
from typing import Sequence

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenText(abc.ABC):
    """Text <-> token ids for one model."""
    eos_token_ids: tuple[int, ...] = ()
    chat_template: str | None = None
    special_tokens: dict[str, str] = {}

    @abc.abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ValueError naming the problem for text that has none."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids (special tokens left out)."""

    @abc.abstractmethod
    def token_text(self, token_id: int) -> str:
        """One token's text as shown in log-prob listings (special tokens included)."""

    def decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class TokenIdText(TokenText):
    """No tokenizer: text is whitespace-separated token ids."""

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        try:
            return [int(word) for word in text.split()]
        except ValueError:
            raise ValueError("this model has no tokenizer: a text prompt must be whitespace-separated token ids, "
                             f"got {text[:60]!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def token_text(self, token_id: int) -> str:
        return str(int(token_id))


class TokenizerText(TokenText):
    """A ``tokenizers.Tokenizer`` and the settings of its ``tokenizer_config.json``."""

    def __init__(self, tokenizer, config: dict | None = None, eos_token_ids: Sequence[int] | None = None,
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        config = config or {}
        self.special_tokens = {name: _token_content(config[name]) for name in SPECIAL_TOKEN_NAMES
                               if config.get(name) is not None}
        if eos_token_ids is None:
            eos = self.special_tokens.get("eos_token")
            eos_id = tokenizer.token_to_id(eos) if eos is not None else None
            eos_token_ids = () if eos_id is None else (eos_id,)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        self.chat_template = chat_template if chat_template is not None else _config_chat_template(config)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)


def _token_content(value) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def _config_chat_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


def load_tokenizer(directory: str | os.PathLike) -> TokenizerText | None:
    """The tokenizer of a checkpoint directory (``tokenizer.json``; None when there is none).

    Special tokens and the chat template come from ``tokenizer_config.json`` (a ``chat_template.jinja`` file takes
    precedence, as transformers reads it), the end-of-sequence ids from ``generation_config.json`` when it names
    them, else from the config's ``eos_token``.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer
    config = _read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE)) or {}
    generation = _read_json(os.path.join(directory, GENERATION_CONFIG_FILE)) or {}
    eos = generation.get("eos_token_id")
    eos_ids = None if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    template = None
    template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
    if os.path.exists(template_path):
        with open(template_path) as fh:
            template = fh.read()
    return TokenizerText(Tokenizer.from_file(path), config, eos_ids, template)


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


class IncrementalDecoder:
    """Token ids in, text deltas out; ``"".join(deltas) + flush()`` equals ``text.decode(ids)``.

    A tokenizer's decoding is not a concatenation of its tokens' texts (spaces, byte-level pieces), so each delta is
    the decoding of a short window of recent tokens minus the decoding of the window's already-shown prefix; a
    window ending in an incomplete character (U+FFFD) is not shown yet.
    """

    def __init__(self, text: TokenText):
        self.text = text
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0    # tokens already shown

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if isinstance(self.text, TokenIdText):
            self._read = len(self.ids)
            return ("" if len(self.ids) == 1 else " ") + str(int(token_id))
        shown = self.text.decode(self.ids[self._prefix:self._read])
        full = self.text.decode(self.ids[self._prefix:])
        if len(full) > len(shown) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return full[len(shown):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character at the end of the generation)."""
        if self._read == len(self.ids):
            return ""
        shown = self.text.decode(self.ids[self._prefix:self._read])
        full = self.text.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return full[len(shown):]


class StopStrings:
    """Cuts generated text at the first stop string (the stop string itself is not returned)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text that can be shown now; ``stopped`` becomes True when a stop string appears."""
        if self.stopped:
            return ""
        text = self._held + delta
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            self._held = ""
            return text[:min(cuts)]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held
