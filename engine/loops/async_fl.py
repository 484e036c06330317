"""Asynchronous federated learning in virtual time, with any server rule and any aggregation
chain (policies/asynchronous.py: FedAsync, FedBuff, FedFix, FedCompass).

The server keeps `concurrency` clients busy. Events sit in a queue ordered by (time, kind, id):
a dispatched client's update ARRIVES (or its loss is noticed) at dispatch time + its task time
(scenarios/devices.py), the server TICKS every `interval_s` if its rule asks for it, and a
FedCompass group reaches its DEADLINE. The rule decides on each event what to aggregate; the
aggregation chain reduces it; attacks corrupt the Byzantine clients' uploads first, and
updates with a NaN or inf are dropped. A client's update depends only on the model version it
was dispatched with, so training is deferred: when the first update of a version is needed,
every pending dispatch of that version trains in one vmapped pool call ("clients dispatched
on the same model version train together"). Staleness tau = versions since dispatch; each
update's tau is in the clients table and in `Updates.staleness`.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.backends.runtime import Pools, pool_of
from engine.compute.evaluation import Evaluator
from engine.compute.pool import finite_rows
from engine.core import parallel
from engine.core.errors import ConfigError
from engine.core.events import NONFINITE, Events
from engine.core.plans import COMPLETED, Dispatch
from engine.core.seeds import SeedTree
from engine.core.updates import Updates
from engine.loops.federated import Accountant, check_finite
from engine.loops.keeper import Keeper
from engine.loops.skeleton import LoopResult, Round, Schedule, Scores, Timing, run_rounds
from engine.loops.world import SyncWorld
from engine.records.logs import MISSING, ClientRows, RoundRows, RunLogger, event_rows
from engine.records.progress import RoundProgress
from policies.asynchronous import Decision, ServerRule
from policies.base import Aggregator
from scenarios.adversaries import Adversary
from scenarios.failures import round_faults

ARRIVAL, TICK, DEADLINE = 0, 1, 2  # event kinds, in tie-break order
RETRY, PERIODIC = -1, -2  # TICK idents: retry dispatching next slot; the rule's periodic tick


@dataclass(frozen=True)
class AsyncSetup:
    rounds: int  # model versions to produce
    eval_every: int
    seeds: SeedTree
    rule: ServerRule
    aggregator: Aggregator
    concurrency: int
    world: SyncWorld  # availability, devices, liveness, faults (slot = slot_s seconds)
    slot_s: float
    adversary: Adversary | None = None
    scaffold: bool = False  # SCAFFOLD: control variates per version, moved as updates land
    privacy: Accountant | None = None  # dp_gaussian: epsilon after a client's n-th step
    dead_rounds: int = 0  # all-dropped rounds in a row that end the run as diverged


class AsyncRun:
    """One asynchronous run: the event queue, the in-flight dispatches, the rule's state and
    the server's model with the versions pending dispatches still need."""

    def __init__(self, setup: AsyncSetup, pools: Pools, params: torch.Tensor,
                 logger: RunLogger) -> None:
        self.setup, self.pools, self.logger, self.rule = setup, pools, logger, setup.rule
        self.params, self.version, self.snapshots = params, 0, {0: params}
        # SCAFFOLD: the server's control c, as each version dispatched it
        self.control = torch.zeros_like(params) if setup.scaffold else None
        self.controls = {0: self.control}
        self.rule_state = setup.rule.init()
        self.agg_state = setup.aggregator.init(params)
        self.queue: list[tuple[float, int, int]] = []
        self.flight: dict[int, Dispatch] = {}
        self.pending: dict[int, list[Dispatch]] = {}  # version -> dispatches not yet trained
        self.busy: set[int] = set()
        self.seq, self.slot, self.online = 0, -1, np.zeros(0, np.int64)
        self.train_calls, self.retry_at, self.version_slot = 0, -1.0, 0
        self.rows: list[tuple[Dispatch, str, float, bool, float]] = []  # of the last version
        self.total_samples = float(setup.world.sizes.sum())
        self.contributions = np.zeros(setup.world.num_clients, np.int64)  # steps each was in

    # -- the queue -----------------------------------------------------------------------

    def push(self, t: float, kind: int, ident: int) -> None:
        heapq.heappush(self.queue, (t, kind, ident))

    def advance(self, t: float) -> None:
        """Step the world's slots up to time t (crashes, churn; availability)."""
        slot = int(t // self.setup.slot_s)
        while self.slot < slot:
            self.slot += 1
            up, events = self.setup.world.liveness.step(self.slot)
            self.online = np.flatnonzero(up & self.setup.world.availability.mask(self.slot))
            self.log_events(self.slot * self.setup.slot_s, events)

    def log_events(self, t: float, events: Events) -> None:
        if events.client_id.size:
            self.logger.append(event_rows(self.version, t, events))

    # -- dispatch ------------------------------------------------------------------------

    def fill(self, t: float) -> None:
        """Dispatch online idle clients, picked by the selection policy, until `concurrency`
        are busy (training, or held by the rule; retry next slot if none is online)."""
        free = self.setup.concurrency - len(self.busy)
        if free <= 0:
            return
        idle = np.setdiff1d(self.online, np.fromiter(self.busy, np.int64, len(self.busy)))
        rng, world = self.setup.seeds.rng("async_dispatch", self.seq), self.setup.world
        chosen = world.selection.choose(idle, free, world.losses, rng)
        for client in chosen:
            self.dispatch(int(client), t)
        retry = (self.slot + 1) * self.setup.slot_s
        if len(self.busy) < self.setup.concurrency and self.retry_at < retry:
            self.retry_at = retry  # nobody idle online: try again next slot
            self.push(retry, TICK, RETRY)

    def dispatch(self, client: int, t: float) -> None:
        world, seq = self.setup.world, self.seq
        self.seq += 1
        ids = np.array([client])
        faults = round_faults(world.cfg.failures, ids, self.setup.seeds.rng("faults", seq))
        self.rule_state, steps, deadline = self.rule.assign(self.rule_state, client, t)
        if steps is None:
            steps = int(world.steps(ids, seq)[0])
        if deadline is not None:
            self.push(deadline[0], DEADLINE, deadline[1])
        up = world.upload if faults.reports[0] else 0
        task = float(world.devices.task_time(ids, np.array([steps]), world.transfer, up)[0])
        status = str(faults.status(COMPLETED)[0])
        d = Dispatch(seq, client, self.version, t, task, steps, status)
        self.flight[seq] = d
        self.busy.add(client)
        if status == COMPLETED:
            self.pending.setdefault(d.version, []).append(d)
        else:
            self.log_events(t, faults.events(ids))
        self.push(t + task, ARRIVAL, seq)

    # -- training ------------------------------------------------------------------------

    def train(self, version: int) -> None:
        """Every pending dispatch of `version`, in one call per pool (vmapped). A pool drops
        an update with a NaN or inf: that dispatch is then `nonfinite`, without a delta."""
        batch = sorted(self.pending.pop(version), key=lambda d: d.client)
        ids = np.array([d.client for d in batch], dtype=np.int64)
        self.train_calls += 1
        results = self.pools.train(self.snapshots[version], ids, self.train_calls, False,
                                   self.controls[version], np.array([d.steps for d in batch]),
                                   control_rows=self.control is not None)
        returned = [row for r in results for row in zip(
            [r.pool] * r.updates.num_clients,
            r.updates.client_ids.tolist(), r.updates.deltas, r.updates.losses.tolist(),
            r.updates.num_samples.tolist(), *(_rows(column, r.updates.client_ids) for column in
                                              (r.control_deltas, r.updates.label_counts,
                                               r.updates.fisher)), strict=True)]
        j = 0  # results come back in id order, like `batch`, less the dropped ones
        for d in batch:
            if j < len(returned) and returned[j][1] == d.client:
                (d.pool, _, d.delta, d.loss, d.samples, d.control, d.label_counts,
                 d.fisher) = returned[j]
                j += 1
            else:
                d.status = NONFINITE

    def release(self, version: int) -> None:
        still = {d.version for d in self.flight.values()} | {self.version}
        if version not in still:
            self.snapshots.pop(version, None)
            self.controls.pop(version, None)

    # -- the server ----------------------------------------------------------------------

    def decide(self, decision: Decision, t: float) -> bool:
        """Apply the rule's decision: aggregate its batch (True if a version was made), then
        dispatch the clients it sends out again (one offline now is freed instead)."""
        self.rule_state = decision.state
        made = self.aggregate(decision.aggregate)
        for client in decision.dispatch:
            if np.any(self.online == client):
                self.dispatch(client, t)
            else:
                self.busy.discard(client)
        return made

    def aggregate(self, batch: tuple[Dispatch, ...]) -> bool:
        """One new version from `batch`: the rule's updates, as the attackers send them, less
        those with a NaN or inf, reduced by the chain; model += scale * step."""
        if not batch:
            return False
        batch = tuple(sorted(batch, key=lambda d: (d.client, d.seq)))
        kept = tuple(d for d in batch if d.status == COMPLETED)
        updates, scale = (self.rule.updates(kept, self.version, self.snapshots.__getitem__,
                                            self.total_samples) if kept else (None, 0.0))
        updates, byzantine = self._attacked(updates, kept)
        updates, dropped = self._finite(updates)
        if updates is not None and updates.num_clients >= max(
                1, self.setup.aggregator.min_updates):  # fewer: the step is skipped
            with parallel.chunk_map(self.pools.chunk_map):
                step, self.agg_state = self.setup.aggregator.update(updates, self.agg_state)
            self.params = self.params + scale * step
            self._move_control(kept, dropped)
            used = [d.client for d in kept if d.seq not in dropped]
            np.add.at(self.contributions, np.array(used, dtype=np.int64), 1)
        self.version += 1
        self.snapshots[self.version] = self.params
        self.controls[self.version] = self.control
        self.rows = self._rows(batch, updates, byzantine, dropped)
        return True

    def _move_control(self, kept: tuple[Dispatch, ...], dropped: set[int]) -> None:
        """SCAFFOLD's server step as updates land: c += (1/N) sum of the aggregated clients'
        delta c_i (N: the population). This is SCAFFOLD's option II (Karimireddy et al., 2020,
        "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", Algorithm 1,
        c <- c + (1/N) sum_{i in S} delta c_i) with S the updates each server step
        aggregates; each dispatch trains with the c of the version it was sent. No
        asynchronous SCAFFOLD paper is followed: this form is our reading, and with one
        client it reduces exactly to the plain run (tested)."""
        if self.control is None:
            return
        moved = [d.control for d in kept if d.seq not in dropped and d.control is not None]
        if moved:
            n = self.setup.world.num_clients
            self.control = self.control + torch.stack(moved).sum(dim=0) / n

    def _attacked(self, updates: Updates | None, kept: tuple[Dispatch, ...]):
        """The updates as the server receives them: the Byzantine clients' rows replaced."""
        adversary = self.setup.adversary
        if updates is None or adversary is None:
            return updates, {}
        by_seq = {d.seq: d.client for d in kept}
        clients = np.array([by_seq[int(s)] for s in updates.client_ids], dtype=np.int64)
        gen = torch.Generator().manual_seed(self.setup.seeds.integer("attack", self.version))
        deltas, mask = adversary.corrupt_rows(updates.deltas, clients, gen)
        return updates._replace(deltas=deltas), dict(zip(updates.client_ids.tolist(),
                                                         mask.tolist(), strict=True))

    @staticmethod
    def _finite(updates: Updates | None) -> tuple[Updates | None, set[int]]:
        if updates is None:
            return None, set()
        finite = finite_rows(updates.deltas)
        if bool(finite.all()):
            return updates, set()
        dropped = set(updates.client_ids[~finite].tolist())
        return updates.take(torch.nonzero(finite).squeeze(1)), dropped

    def _rows(self, batch, updates, byzantine, dropped) -> list:
        """(dispatch, status, weight, byzantine, norm of what it sent) for the clients table."""
        sent = {} if updates is None else dict(zip(
            updates.client_ids.tolist(),
            zip(updates.weights.tolist(),
                torch.linalg.vector_norm(updates.deltas, dim=1).tolist(), strict=True),
            strict=True))
        rows = []
        for d in batch:
            status = NONFINITE if d.seq in dropped else d.status
            weight, norm = sent.get(d.seq, (0.0, math.nan))
            rows.append((d, status, weight, bool(byzantine.get(d.seq, False)), norm))
        return rows


def _rows(rows: torch.Tensor | None, ids: torch.Tensor) -> list:
    return [None] * len(ids) if rows is None else list(rows)


def check_assigned_steps(rule: ServerRule, world: SyncWorld) -> None:
    """A rule that assigns every dispatch's local steps (FedCompass) gets the pools to train
    exactly those: the config must not set step counts of its own, and every client's
    `local_epochs` of batches must hold the most steps it may assign. One-line ConfigErrors."""
    if not rule.assigns_steps:
        return
    q_max = rule.max_local_steps
    if world.cfg.training.max_local_steps is not None or world.anarchic:
        raise ConfigError("training.max_local_steps / anarchic availability with "
                          f"server.mode={world.cfg.server.mode}: the server assigns each "
                          "client's local steps from its speed (FedCompass); a step budget, or "
                          "clients choosing their own, would contradict it")
    caps = world.steps(np.arange(world.num_clients), 0)  # local_epochs of batches
    c = int(np.argmin(caps))
    if caps[c] < q_max:
        raise ConfigError(
            f"server.max_local_steps={q_max} exceeds the {int(caps[c])} steps "
            f"training.local_epochs={world.hp.epochs} give client {c} ({int(world.sizes[c])} "
            f"samples, batch {world.hp.batch_size}): raise training.local_epochs or lower "
            "server.max_local_steps")


class AsyncServer:
    """The round loop of an asynchronous server: a "round" is one model version."""

    consensus_distance = None

    def __init__(self, setup: AsyncSetup, pools: Pools, params: torch.Tensor,
                 evaluator: Evaluator, logger: RunLogger) -> None:
        self.run, self.evaluator, self.setup = AsyncRun(setup, pools, params, logger), evaluator, \
            setup
        self.run.advance(0.0)
        self.run.fill(0.0)
        if setup.rule.interval_s is not None:
            self.run.push(setup.rule.interval_s, TICK, PERIODIC)
        self.t = 0.0

    def step(self, r: int, last: bool) -> Round | None:
        """Events until the next version exists; None if the queue empties or every client is
        gone (the run ends with the versions it made)."""
        run, start = self.run, time.perf_counter()
        while run.queue and not _stalled(run):
            self.t, kind, ident = heapq.heappop(run.queue)
            run.advance(self.t)
            made = _EVENTS[kind](run, self.t, ident)
            run.fill(self.t)
            if made:
                run.version_slot = run.slot
                used = [d for d, status, *_ in run.rows if status == COMPLETED]
                dropped = sum(status == NONFINITE for _, status, *_ in run.rows)
                losses = np.array([d.loss for d in used])
                return Round(len(used), float(losses.mean()) if losses.size else MISSING,
                             time.perf_counter() - start, 0.0, dropped)
        return None

    def evaluate(self, r: int) -> Scores:
        return Scores(*self.evaluator(self.run.params))

    def record(self, r: int, done: Round, scores: Scores, timing: Timing) -> None:
        _log_version(self.run, r, self.t, done, scores, timing)

    def check(self, r: int) -> None:
        check_finite(self.run.params, f"the global model is not finite after version {r}")

    def model(self) -> torch.Tensor:
        return self.run.params


def async_rounds(setup: AsyncSetup, pools: Pools, params: torch.Tensor, evaluator: Evaluator,
                 logger: RunLogger, progress: RoundProgress,
                 keeper: Keeper | None = None) -> LoopResult:
    """Run events until `rounds` model versions exist; log one rounds row per version."""
    loop = AsyncServer(setup, pools, params, evaluator, logger)
    return run_rounds(loop, Schedule(setup.rounds, setup.eval_every, setup.dead_rounds), progress,
                      keeper)


STALL_SLOTS = 10_000


def _stalled(run: AsyncRun) -> bool:
    """Nobody in flight and no new version for STALL_SLOTS slots: every client is gone
    (crash-stop, churn). The run ends with the versions it made."""
    return not run.flight and run.slot - run.version_slot > STALL_SLOTS


def _arrival(run: AsyncRun, t: float, seq: int) -> bool:
    """An update is back (or its loss is noticed): the rule files it. An update found
    non-finite arrives too (it is dropped when its batch is aggregated)."""
    d = run.flight.pop(seq)
    if d.status == COMPLETED and d.delta is None:
        run.train(d.version)
    came = d.status in (COMPLETED, NONFINITE)
    if d.status == COMPLETED:  # its loss, for loss-based selection (power-of-choice)
        run.setup.world.reported(np.array([d.client]), np.array([d.loss]))
    if not (came and run.rule.holds_clients):
        run.busy.discard(d.client)
    handler = run.rule.arrive if came else run.rule.lost
    made = run.decide(handler(run.rule_state, d, t), t)
    run.release(d.version)
    return made


def _tick(run: AsyncRun, t: float, ident: int) -> bool:
    if ident == RETRY:  # dispatching is retried: `fill` runs after every event
        return False
    run.push(t + run.rule.interval_s, TICK, PERIODIC)
    return run.decide(run.rule.tick(run.rule_state, t), t)


def _deadline(run: AsyncRun, t: float, ident: int) -> bool:
    return run.decide(run.rule.deadline(run.rule_state, ident, t), t)


_EVENTS = {ARRIVAL: _arrival, TICK: _tick, DEADLINE: _deadline}


def _log_version(run: AsyncRun, v: int, t: float, done: Round, scores: Scores,
                 timing: Timing) -> None:
    """The rounds row of version v (made at virtual time t), and its arrivals' client rows."""
    rows, run.rows = run.rows, []
    run.logger.append(_client_rows(v, rows, run))
    dropped = [d.client for d, status, *_ in rows if status == NONFINITE]
    run.log_events(t, Events.of(NONFINITE, np.array(dropped, dtype=np.int64)))
    run.logger.append(RoundRows(
        round=[v], num_selected=[len(rows)], num_updates=[len(rows) - len(dropped)],
        num_byzantine=[sum(b for *_, b, _ in rows)], train_loss=[done.train_loss],
        test_loss=[scores.loss], test_accuracy=[scores.accuracy],
        test_return=[scores.test_return], mean_update_norm=[MISSING],
        round_wall_s=[timing.round_s], train_wall_s=[MISSING], aggregate_wall_s=[MISSING],
        eval_wall_s=[MISSING], wall_time_s=[timing.wall_s],
        client_updates_per_s=[len(rows) / max(timing.round_s, 1e-9)], virtual_time=[t],
        dp_epsilon=[MISSING if run.setup.privacy is None
                    else run.setup.privacy(int(run.contributions.max()))],
        bytes_communicated=[len(rows) * (run.setup.world.transfer + run.setup.world.upload)],
    ))


def _client_rows(v: int, rows: list, run: AsyncRun) -> ClientRows:
    ids = np.array([d.client for d, *_ in rows], dtype=np.int64)
    return ClientRows(
        round=np.full(ids.size, v), client_id=ids,
        pool=np.where([d.pool >= 0 for d, *_ in rows], [d.pool for d, *_ in rows],
                      pool_of(run.pools.bounds, ids)),  # else: its shard's
        status=np.array([s for _, s, *_ in rows], dtype=object),
        num_samples=np.array([d.samples for d, *_ in rows]),
        local_steps=np.array([d.steps for d, *_ in rows]),
        train_loss=np.array([d.loss for d, *_ in rows]),
        update_norm=np.array([n for *_, n in rows]),
        weight=np.array([w for _, _, w, _, _ in rows]),
        pool_train_s=np.full(ids.size, MISSING, dtype=object),
        byzantine=np.array([b for *_, b, _ in rows], dtype=bool),
        task_s=np.array([d.task_s for d, *_ in rows]),
        staleness=np.array([v - d.version for d, *_ in rows]),
        bytes_up=np.full(ids.size, run.setup.world.upload),
    )
