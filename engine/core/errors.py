"""The errors every layer raises, and how an error line shows a value."""

from __future__ import annotations

from typing import Any

SHOWN_CHARS = 100  # an echoed value is cut to about this many characters


class ConfigError(ValueError):
    """A bad config or bad input: the message is one line naming the key and what is allowed."""


class Diverged(ArithmeticError):
    """The global model (or a peer's model) is no longer finite: the run ends, `diverged`."""


def shown(value: Any) -> str:
    """repr(value), cut to about SHOWN_CHARS characters for an error line."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"
