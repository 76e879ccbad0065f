"""Typed, frozen configuration dataclasses: every field checked on construction, one ``key=value`` override path.

Every configuration of m1jax (the model's architecture and execution settings, training, RL, rollout, generation)
is a frozen dataclass deriving from ``Config``. On construction each field is checked against its annotation: a
string where a number or a bool belongs, a bool where an int belongs, or a value outside a field's ``choices`` is a
``ConfigError`` that names the class and the field. ``int`` values are accepted for ``float`` fields (and stored as
float), lists for tuple fields (stored as tuples, so configs stay hashable and can be static jit arguments).

Field metadata understood here (``dataclasses.field(metadata=...)``, or the ``setting`` helper):
  choices:  the allowed values (None is allowed when the annotation is Optional).
  resume:   False for a setting that may change when a run is resumed (execution settings such as the compute
            dtype); True (the default) for one that a resumed run must keep (architecture, optimizer).
  help:     one line for ``--help``-style listings.

Overrides are strings ``key=value`` (the ``--set`` flag of every entry point), parsed by the field's type:
``true/false/1/0/yes/no/on/off`` for bools, ``none``/``null`` for Optional fields, ``a,b,c`` for tuples.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Iterable, Mapping, Sequence


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names the field and what would be valid."""


def setting(default=dataclasses.MISSING, *, choices: Sequence | None = None, resume: bool = True,
            help: str = "", default_factory=dataclasses.MISSING):  # noqa: A002 (help is the natural name here)
    """``dataclasses.field`` with the metadata ``Config`` understands (see the module docstring)."""
    metadata = {"resume": resume, "help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


def _describe(hint) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple or hint is tuple:
        return "a tuple"
    return getattr(hint, "__name__", str(hint))


def check_value(owner: str, name: str, hint, value):
    """``value`` checked (and normalised: int -> float, list -> tuple) against the type ``hint``; raises ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_value(owner, name, option, value)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{owner}.{name}: expected {_describe(hint)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple or hint is tuple:
        if isinstance(value, (list, tuple)):
            if args and (len(args) == 2 and args[1] is Ellipsis):
                return tuple(check_value(owner, f"{name}[{i}]", args[0], v) for i, v in enumerate(value))
            if args:
                if len(args) != len(value):
                    raise ConfigError(f"{owner}.{name}: expected {len(args)} entries, got {len(value)}")
                return tuple(check_value(owner, f"{name}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    else:
        return value  # an annotation this checker does not know (nested configs check themselves)
    raise ConfigError(f"{owner}.{name}: expected {_describe(hint)}, got {type(value).__name__} {value!r}")


def parse_value(owner: str, name: str, hint, text: str):
    """The value of ``text`` (from ``key=value``) for a field annotated ``hint``."""
    low = text.strip().lower()
    if _is_optional(hint):
        if low in ("none", "null"):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{owner}.{name}: expected a boolean (true/false), got {text!r}")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{owner}.{name}: expected an integer, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{owner}.{name}: expected a number, got {text!r}") from None
    if typing.get_origin(hint) is tuple or hint is tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        inner = typing.get_args(hint)
        if inner and len(inner) == 2 and inner[1] is Ellipsis:
            return tuple(parse_value(owner, name, inner[0], item) for item in items)
        return tuple(items)
    return text


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every m1jax configuration (see the module docstring)."""

    def __post_init__(self):
        hints = _type_hints(type(self))
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            value = check_value(owner, f.name, hints[f.name], getattr(self, f.name))
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"{owner}.{f.name}: must be one of {list(choices)}, got {value!r}")
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Checks across fields; subclasses raise ConfigError naming the field."""

    # ------------------------------------------------------------------------------------------------ fields
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def fixed_on_resume(cls) -> tuple[str, ...]:
        """Fields a resumed run must keep (metadata ``resume`` True, the default)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume", True))

    def replace(self, **changes):
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} fields {unknown}; known: {sorted(self.field_names())}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------ dicts
    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists)."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base: "Config | None" = None, source: str = "config"):
        """A config from a mapping of field values: unknown keys are an error; so are missing ones unless ``base``
        (whose values fill them) is given. ``source`` names where the mapping came from, for the messages."""
        names = set(cls.field_names())
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown {cls.__name__} keys {unknown}")
        if base is None:
            missing = sorted(names - set(d))
            if missing:
                raise ConfigError(f"{source}: {cls.__name__} is incomplete, missing {missing}; give every field or "
                                  f"name a base preset")
            return cls(**d)
        return cls(**{**{n: getattr(base, n) for n in names}, **d})

    # ------------------------------------------------------------------------------------------------ overrides
    def override(self, items: Iterable[str]):
        """This config with ``key=value`` strings applied (typed by the fields; see ``parse_override``)."""
        changes: dict[str, Any] = {}
        for item in items:
            key, value = self.parse_override(item)
            if key in changes:
                raise ConfigError(f"config key {key!r} is overridden twice")
            changes[key] = value
        return self.replace(**changes) if changes else self

    @classmethod
    def parse_override(cls, item: str) -> tuple[str, Any]:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        if key not in cls.field_names():
            raise ConfigError(f"unknown config key {key!r} in override {item!r} ({cls.__name__}); known keys: "
                              f"{sorted(cls.field_names())}")
        return key, parse_value(cls.__name__, key, _type_hints(cls)[key], text)


def apply_section_overrides(sections: Mapping[str, Config], items: Iterable[str]) -> dict[str, Config]:
    """Apply ``--set`` items to several named configs (``{"model": ModelConfig, "train": TrainConfig, ...}``).

    An item is ``section.key=value``, or ``key=value`` when exactly one section has that key. Unknown keys, keys of
    several sections given without a section, and a key given twice are ConfigErrors naming them.
    """
    grouped: dict[str, list[str]] = {name: [] for name in sections}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        section, _, field = key.rpartition(".")
        if section:
            if section not in sections:
                raise ConfigError(f"override {item!r}: unknown section {section!r}; sections are {sorted(sections)}")
            owners = [section]
        else:
            owners = [name for name, cfg in sections.items() if field in cfg.field_names()]
            if not owners:
                known = {name: sorted(cfg.field_names()) for name, cfg in sections.items()}
                raise ConfigError(f"unknown config key {field!r} in override {item!r}; known keys: {known}")
            if len(owners) > 1:
                raise ConfigError(f"config key {field!r} belongs to several sections {owners}: write "
                                  f"{owners[0]}.{field}=...")
        grouped[owners[0]].append(f"{field}={value}")
    return {name: cfg.override(grouped[name]) for name, cfg in sections.items()}
