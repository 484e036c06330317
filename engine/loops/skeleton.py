"""The one skeleton every protocol's loop runs: rounds (or model versions, or units of
virtual time), the evaluation schedule, timers, round records, the diverged check and the
summary. A protocol supplies what one round does:

    step(r, last)      run round r (the last one merges, where the protocol has a merge);
                       returns a Round, or None when nothing more can happen (every client
                       gone)
    evaluate(r)        (test loss, test accuracy) of the protocol's model (or, for a task
                       learnt by acting, its mean test return)
    record(r, round, scores, timing)
                       append round r's rows to the logger
    check(r)           raise Diverged if a model is no longer finite (the skeleton also ends
                       the run as diverged on a non-finite evaluated loss, or after
                       `dead_rounds` rounds in a row whose every update was dropped)
    model()            the final model (global, or the peers' mean)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from engine.core.errors import Diverged, PoolDied, Stop, stopped
from engine.loops.keeper import Keeper, Tally
from engine.records.logs import MISSING
from engine.records.progress import RoundProgress


@dataclass(frozen=True)
class Schedule:
    rounds: int
    eval_every: int  # 0: the last round only
    dead_rounds: int = 0  # rounds in a row with every update dropped that end the run; 0: never

    def due(self, r: int) -> bool:
        """Evaluate after round r: every `eval_every` rounds, and always after the last."""
        return r == self.rounds - 1 or (self.eval_every > 0 and (r + 1) % self.eval_every == 0)


class Round(NamedTuple):
    """What one round did, for the skeleton's records and progress bar."""

    updates: int  # client (peer) updates it used
    train_loss: float | None
    train_s: float  # wall seconds training (with gossip, for peers)
    aggregate_s: float  # wall seconds aggregating (consensus sums, merge)
    dropped: int = 0  # updates dropped for a NaN or inf


class Scores(NamedTuple):
    loss: float | None
    accuracy: float | None
    test_return: float | None = MISSING  # a task learnt by acting (no loss, no accuracy)

    @property
    def score(self) -> float | None:
        """The run's headline figure: test accuracy, or the test return when there is one."""
        return self.accuracy if self.test_return is MISSING else self.test_return


NOT_EVALUATED = Scores(MISSING, MISSING)


class Timing(NamedTuple):
    """perf_counter marks of a round: its start, after its step, after evaluation; and the
    run's start."""

    start: float
    stepped: float
    evaluated: float
    run_start: float

    @property
    def round_s(self) -> float:
        return self.evaluated - self.start

    @property
    def eval_s(self) -> float:
        return self.evaluated - self.stepped

    @property
    def wall_s(self) -> float:
        return self.evaluated - self.run_start


class RoundLoop(Protocol):
    def step(self, r: int, last: bool) -> Round | None: ...

    def evaluate(self, r: int) -> Scores: ...

    def record(self, r: int, done: Round, scores: Scores, timing: Timing) -> None: ...

    def check(self, r: int) -> None: ...

    def model(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class LoopResult:
    params: torch.Tensor  # the final model: the global one, or the peers' average
    rounds_done: int
    final_accuracy: float
    best_accuracy: float
    wall_s: float
    client_updates: int  # client (peer) updates used
    consensus_distance: float | None = None  # peers: mean ||z_i - z_bar||^2 at the end


def run_rounds(loop: RoundLoop, schedule: Schedule, progress: RoundProgress,
               keeper: Keeper | None = None) -> LoopResult:
    """Round after round until the schedule's last (or the loop has nothing left to do).
    With a `keeper`: a checkpoint at the start and every `keeper.every` rounds (a resumed run
    starts from its checkpoint instead), a dead pool replaced and the rounds since the last
    checkpoint replayed, and a signal's stop taken at the end of a round, checkpointed."""
    tally = Tally()
    if keeper is not None:
        loop, tally = keeper.begin(loop, tally)
        progress.skip_to(tally.next_round)
    start = time.perf_counter()
    Stop.active += 1
    try:
        while tally.next_round < schedule.rounds:
            r, signum = tally.next_round, None
            try:
                step = _round(loop, schedule, progress, tally, r, start)
                if step is None:
                    break
                signum = Stop.take()
                if keeper is not None and (keeper.due(r) or signum is not None):
                    keeper.save(loop, tally)  # a pool may die here too
            except PoolDied as err:
                if keeper is None:
                    raise
                loop, tally = keeper.recover(err)
                progress.skip_to(tally.next_round)
            if signum is not None:
                raise stopped(signum)
    finally:
        Stop.active -= 1
    evaluated = [a for a in tally.accuracies if a is not MISSING] or [math.nan]
    return LoopResult(loop.model(), tally.done, evaluated[-1], max(evaluated),
                      time.perf_counter() - start, tally.updates,
                      getattr(loop, "consensus_distance", None))


def _round(loop: RoundLoop, schedule: Schedule, progress: RoundProgress, tally: Tally,
           r: int, start: float) -> Round | None:
    """Round r: step, evaluation on the schedule, records, checks; the tally moves on."""
    t0 = time.perf_counter()
    step = loop.step(r, r == schedule.rounds - 1)
    if step is None:
        return None
    t1 = time.perf_counter()
    scores = loop.evaluate(r) if schedule.due(r) else NOT_EVALUATED
    timing = Timing(t0, t1, time.perf_counter(), start)
    loop.record(r, step, scores, timing)
    tally.accuracies.append(scores.score)
    tally.updates, tally.done = tally.updates + step.updates, tally.done + 1
    tally.next_round = r + 1
    progress.update(scores.score, step.train_loss, step.updates / max(timing.round_s, 1e-9))
    loop.check(r)
    tally.dead = tally.dead + 1 if step.dropped and not step.updates else 0
    _check_alive(r, scores, tally.dead, schedule.dead_rounds)
    return step


def _check_alive(r: int, scores: Scores, dead: int, bound: int) -> None:
    """A finite model can still be dead: its evaluated loss overflows, or every update it
    produces overflows and is dropped. Either ends the run as diverged (after the round's
    rows are logged), with one line naming the round."""
    if scores.loss is not MISSING and scores.loss is not None and not math.isfinite(
            scores.loss):
        raise Diverged(f"the test loss is {scores.loss} after round {r}")
    if bound and dead >= bound:
        raise Diverged(f"every update was dropped as non-finite in rounds {r - dead + 1}-{r} "
                       f"({dead} in a row; diverge_after={bound})")
