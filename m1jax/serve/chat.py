"""A model's chat template, rendered as transformers' ``apply_chat_template`` renders it.

The same jinja2 set-up (a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the loop-control
extension, a ``{% generation %}`` block that renders its body, the ``tojson`` filter without HTML escaping, the
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace`` globals) and the same variables: ``messages``,
``tools``, ``documents``, ``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``,
``eos_token``, ...), plus any extra keyword the caller passes. Messages are normalised as transformers does (keys
whose value is None dropped; a reasoning field copied to ``reasoning_content`` and ``thinking``).

Message content: OpenAI clients send a string or a list of ``{"type": "text", "text": ...}`` parts. Some templates
read a string (``message['content']``), others a list of parts (MiniMax-M1's reads ``message['content'][0]['text']``);
``content_format`` tells which from the template's syntax tree, and ``render`` converts the content to what the
template reads (a string becomes one text part; text parts are joined with newlines).
"""
from __future__ import annotations

import datetime
import json
from typing import Any, Mapping, Sequence

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant tokens with it): the body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """jinja2's namespace without underscore attributes (as transformers restricts it)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, dict=Dict(), namespace=Namespace,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env


def content_format(source: str) -> str:
    """``"parts"`` when the template indexes or iterates a message's content (it expects a list of parts), else
    ``"string"``."""
    import jinja2.nodes as n
    env = _environment()
    tree = env.parse(source)

    def is_content(node) -> bool:
        while isinstance(node, n.Filter):  # message['content'] | selectattr(...)
            node = node.node
        if isinstance(node, n.Getitem):
            return isinstance(node.arg, n.Const) and node.arg.value == "content"
        return isinstance(node, n.Getattr) and node.attr == "content"

    for node in tree.find_all((n.Getitem, n.For)):
        if isinstance(node, n.For) and is_content(node.iter):
            return "parts"
        if isinstance(node, n.Getitem) and is_content(node.node) and not (
                isinstance(node.arg, n.Const) and isinstance(node.arg.value, str)):
            return "parts"
    return "string"


def _text_of(parts: Sequence[Mapping[str, Any]]) -> str:
    texts = []
    for part in parts:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"message content parts must be {{'type': 'text', 'text': ...}}, got {dict(part)}")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatTemplate:
    """A compiled chat template and the special tokens it may read."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.template = _environment().from_string(source)
        self.special_tokens = dict(special_tokens or {})
        self.content_format = content_format(source)

    def normalise(self, messages: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Messages as transformers passes them to the template, with their content in the template's format."""
        out = []
        for message in messages:
            message = {k: v for k, v in dict(message).items() if v is not None}
            reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            content = message.get("content")
            if self.content_format == "parts" and isinstance(content, str):
                message["content"] = [{"type": "text", "text": content}]
            elif self.content_format == "string" and isinstance(content, list):
                message["content"] = _text_of(content)
            out.append(message)
        return out

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[Mapping] | None = None, documents: Sequence[Mapping] | None = None, **kwargs) -> str:
        """The prompt text; ``kwargs`` are extra template variables (they override the special tokens)."""
        if not messages:
            raise ValueError("messages must not be empty")
        variables = {**self.special_tokens, **kwargs}
        return self.template.render(messages=self.normalise(messages), tools=None if tools is None else list(tools),
                                    documents=None if documents is None else list(documents),
                                    add_generation_prompt=add_generation_prompt, **variables)
