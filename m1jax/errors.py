"""What counts as the user's mistake, and how an entry point reports it: one line, exit code 2, no traceback.

The library raises ``ConfigError`` (m1jax.config), ``DataError`` (m1jax.data) and ``CheckpointError``
(m1jax.safetensors_io) for input a user can fix: a wrong key or value, a missing or damaged file, token ids outside the
vocabulary. Entry points run inside ``user_errors()``; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class UserError(ValueError):
    """A problem with the user's input that has no more specific class (a bad flag combination, say)."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from m1jax.config import ConfigError
    from m1jax.data import DataError
    from m1jax.safetensors_io import CheckpointError
    return (UserError, ConfigError, DataError, CheckpointError)


@contextlib.contextmanager
def user_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Report the user's mistakes raised inside as ``error: <message>`` on stderr and exit with code 2."""
    try:
        yield
    except user_error_types() + tuple(extra) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
