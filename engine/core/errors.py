"""The errors every layer raises, and how an error line shows a value."""

from __future__ import annotations

import signal
from typing import Any

SHOWN_CHARS = 100  # an echoed value is cut to about this many characters


class ConfigError(ValueError):
    """A bad config or bad input: the message is one line naming the key and what is allowed."""


class Diverged(ArithmeticError):
    """The global model (or a peer's model) is no longer finite: the run ends, `diverged`."""


class PoolDied(RuntimeError):
    """A pool's actor died (its process was killed, its node lost): the run replaces it and
    replays from its last checkpoint."""

    def __init__(self, pool: int, detail: str = "") -> None:
        super().__init__(f"pool {pool} died" + (f" ({detail})" if detail else ""))
        self.pool = pool


class PoolLost(RuntimeError):
    """A pool died more often than a run replaces pools: the run ends, failed."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as Ctrl-C is (run.py installs the handler), so a
    terminated run ends the same clean way as an interrupted one: outcome `interrupted`."""


class Stop:
    """A stop asked for by a signal (run.py installs `on_signal` for SIGINT and SIGTERM).
    While a round loop runs (`active`), the first signal only asks: the loop finishes its
    round, writes a checkpoint and ends as interrupted. A second signal, or one outside a
    round loop, stops at once."""

    active = 0
    requested: int | None = None

    @classmethod
    def take(cls) -> int | None:
        """The signal asked for, if any (then cleared)."""
        signum, cls.requested = cls.requested, None
        return signum


def stopped(signum: int) -> KeyboardInterrupt:
    """The exception a signal ends a run with: Terminated for SIGTERM, else KeyboardInterrupt."""
    return Terminated(f"signal {signum}") if signum == signal.SIGTERM else KeyboardInterrupt()


def on_signal(signum: int, frame: Any) -> None:
    if Stop.active and Stop.requested is None:
        Stop.requested = signum
        return
    raise stopped(signum)


def shown(value: Any) -> str:
    """repr(value), cut to about SHOWN_CHARS characters for an error line."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} chars)"
