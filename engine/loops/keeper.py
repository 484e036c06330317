"""Checkpoints of a running round loop: what lets a run survive a dead pool and be resumed.

A checkpoint holds everything the run would go on with, pickled whole (engine/core/
checkpoint.py): the loop object (global model, every policy's state, the world's state with
its clocks and chains, an asynchronous run's event queue and model versions), the skeleton's
tally (rounds done, accuracies so far), every pool's state (per-client rows, peers' models),
and the logger's position (every row up to the checkpoint is flushed first). It is written
atomically, one file per run, replaced each time:

    <log dir>/<experiment>/checkpoints/run_id=<id>/checkpoint.pkl

A run writes one at its start (replay from round 0), then every `every` rounds (model
versions for an asynchronous server, units of virtual time for asynchronous gossip), and when
a signal asks it to stop. Restoring one rewinds the logs to its position (rows written after
it are deleted), so a resumed or replayed run writes each row exactly once, and, every draw
coming from the seed tree, the same bits as a run that was never stopped.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.backends.runtime import Pools
from engine.compute.evaluation import Evaluator
from engine.core.checkpoint import dumps, loads, write_atomic
from engine.core.errors import PoolDied, PoolLost
from engine.core.events import POOL_RESTART, Events
from engine.records.logs import RunLogger, event_rows

FORMAT = 1


@dataclass
class Tally:
    """The skeleton's running totals, checkpointed with the loop."""

    next_round: int = 0
    accuracies: list = field(default_factory=list)
    updates: int = 0
    done: int = 0
    dead: int = 0  # rounds in a row whose every update was dropped


def checkpoint_path(log_dir: Path, run_id: str) -> Path:
    return Path(log_dir) / "checkpoints" / f"run_id={run_id}" / "checkpoint.pkl"


def read_checkpoint(path: Path) -> dict:
    """A checkpoint file's contents (its `meta` says how to rebuild the run)."""
    blob = pickle.loads(Path(path).read_bytes())  # noqa: S301 (our own file)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a checkpoint of this version")
    return blob


class Keeper:
    """Saves and restores one run's checkpoints; replaces dead pools (at most
    `max_restarts` times a run) and rolls the run back to its last checkpoint."""

    def __init__(self, path: Path, every: int, pools: Pools, logger: RunLogger,
                 evaluator: Evaluator, meta: dict[str, Any], resume: bool = False,
                 max_restarts: int = 3) -> None:
        self.path, self.every, self.meta, self.resume = Path(path), every, meta, resume
        self.pools, self.logger, self.evaluator = pools, logger, evaluator
        self.max_restarts, self.restarts = max_restarts, 0

    def _live(self) -> dict[str, Any]:
        return {"pools": self.pools, "logger": self.logger, "evaluator": self.evaluator}

    def begin(self, loop: Any, tally: Tally) -> tuple[Any, Tally]:
        """A resumed run's loop and tally from its checkpoint; else the start's checkpoint.
        A pool that dies meanwhile is replaced (it counts as a restart) and begin retried."""
        while True:
            try:
                if self.resume:
                    return self._load()
                self.save(loop, tally)
                return loop, tally
            except PoolDied as err:
                self._replace(err)

    def _replace(self, err: PoolDied) -> None:
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise PoolLost(f"{err}; pools died {self.restarts} times in this run, more than "
                           f"the {self.max_restarts} restarts a run makes") from None
        self.pools.restart(err.pool)

    def due(self, r: int) -> bool:
        return self.every > 0 and (r + 1) % self.every == 0

    def save(self, loop: Any, tally: Tally) -> None:
        blob = {"format": FORMAT, "meta": self.meta, "next_round": tally.next_round,
                "logger": self.logger.position(), "pools": self.pools.snapshot(),
                "loop": dumps((loop, tally), self._live())}
        write_atomic(self.path, pickle.dumps(blob, protocol=pickle.HIGHEST_PROTOCOL))

    def _load(self) -> tuple[Any, Tally]:
        blob = read_checkpoint(self.path)
        self.pools.restore(blob["pools"])
        self.logger.rewind(blob["logger"])
        return loads(blob["loop"], self._live())

    def recover(self, err: PoolDied) -> tuple[Any, Tally]:
        """Replace the dead pool, go back to the last checkpoint (the work since is replayed),
        and log a `pool_restart` event (client_id: the pool; value: the seconds it took)."""
        start = time.perf_counter()
        self._replace(err)
        loop, tally = self._load()
        # value: the wall seconds the new actor and the restore took
        self.logger.append(event_rows(tally.next_round, float(tally.next_round),
                                      Events.of(POOL_RESTART, [max(err.pool, 0)],
                                                time.perf_counter() - start)))
        return loop, tally
