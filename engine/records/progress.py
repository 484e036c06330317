"""The live progress bar: round, test accuracy, train loss, client-updates/s and ETA."""

from __future__ import annotations

import math
import sys

from tqdm import tqdm


class RoundProgress:
    def __init__(self, total_rounds: int, enabled: bool = True) -> None:
        self._bar = tqdm(total=total_rounds, unit="round", file=sys.stderr, disable=not enabled,
                         dynamic_ncols=True, mininterval=0.25,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}"
                                    "{postfix}]")
        self._accuracy = math.nan

    def update(self, accuracy: float | None, train_loss: float | None,
               updates_per_s: float) -> None:
        if accuracy is not None:
            self._accuracy = accuracy
        self._bar.set_postfix_str(
            f"acc={self._accuracy:.3f} loss={math.nan if train_loss is None else train_loss:.3f}"
            f" upd/s={updates_per_s:,.0f}",
            refresh=False,
        )
        self._bar.update(1)

    def skip_to(self, rounds_done: int) -> None:
        """A resumed run: the rounds done before it."""
        self._bar.update(rounds_done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


class SweepProgress:
    """Runs done / running / failed / skipped and the sweep's ETA; one line per finished run."""

    def __init__(self, total_runs: int, skipped: int, enabled: bool = True) -> None:
        self._bar = tqdm(total=total_runs, unit="run", file=sys.stderr, disable=not enabled,
                         dynamic_ncols=True, mininterval=0.25,
                         bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}<"
                                    "{remaining}{postfix}]")
        self.skipped, self.failed = skipped, 0

    def running(self, count: int) -> None:
        self._bar.set_postfix_str(f"running={count} failed={self.failed} "
                                  f"skipped={self.skipped}")

    def finished(self, line: str, failed: bool, running: int) -> None:
        self.failed += failed
        tqdm.write(line, file=sys.stdout)
        self.running(running)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
