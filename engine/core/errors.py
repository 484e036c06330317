"""The errors every layer raises, and how an error line shows a value."""

from __future__ import annotations

from typing import Any

SHOWN_CHARS = 100  # an echoed value is cut to about this many characters


class ConfigError(ValueError):
    """A bad config or bad input: the message is one line naming the key and what is allowed."""


class Diverged(ArithmeticError):
    """The global model (or a peer's model) is no longer finite: the run ends, `diverged`."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is (run.py installs the handler), so a
    terminated run ends the same clean way as an interrupted one: outcome `interrupted`."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def shown(value: Any) -> str:
    """repr(value), cut to about SHOWN_CHARS characters for an error line."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"
