"""Asynchronous federated learning in virtual time: FedAsync, FedBuff, FedFix and FedCompass.

The server keeps `concurrency` clients busy. Events sit in a queue ordered by (time, kind, id):
a dispatched client's update ARRIVES (or its FAILURE is noticed) at dispatch time + its task
time (scenarios/devices.py), and FedFix's server TICKS every `interval_s`. On each event the
server may aggregate (a new model version) and dispatches a fresh online client in the freed
slot. A client's update depends only on the model version it was dispatched with, so training
is deferred: when the first update of a version is needed, every pending dispatch of that
version trains in one vmapped pool call ("clients dispatched on the same model version train
together"). Staleness tau = versions since dispatch; each update's tau is in the clients table.

    FedAsync (Xie, Koyejo & Gupta, 2019): every arrival: x <- (1 - a) x + a x_i,
        a = alpha * s(tau), x_i = x_{dispatch} + delta_i.
    FedBuff (Nguyen et al., 2022): every B arrivals: x <- x + lr * mean_i s(tau_i) delta_i.
    FedFix (Fraboni, Vidal, Kameni & Lorenzi, 2023): every interval_s of virtual time:
        x <- x + lr * sum_i n_i delta_i / sum_i n_i over the updates received in the interval.
    FedCompass (Li, Chaturvedi, He, Chen, Singh, Kindratenko, Huerta, Kim & Madduri, ICLR 2024,
        "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client Devices
        using a Computing Power Aware Scheduler", arXiv 2309.14675), semi-asynchronous: the
        server's COMPASS scheduler estimates each client's seconds per local step and gives it
        Q in [Q_min, Q_max] steps so that clients come back in arrival groups; a group is
        aggregated when its last member is back or at its latest arrival time (lambda times its
        expected duration), with the late updates buffered since:
        x <- x + alpha * sum_i s(tau_i) n_i / n delta_i. Its members then get new steps that
        make them join a group still out, or open one (class Compass). The server assigns
        each dispatch's steps, so the pools train exactly those (check_compass).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.backends.runtime import Pools, pool_of
from engine.compute.evaluation import Evaluator
from engine.core.config import ServerConfig
from engine.core.errors import ConfigError
from engine.core.events import Events
from engine.core.plans import COMPLETED
from engine.core.seeds import SeedTree
from engine.loops.federated import LoopResult, check_finite
from engine.loops.world import SyncWorld
from engine.records.logs import MISSING, ClientRows, RoundRows, RunLogger, event_rows
from engine.records.progress import RoundProgress
from policies.staleness import staleness_weight
from scenarios.failures import round_faults

ARRIVAL, TICK, DEADLINE = 0, 1, 2  # event kinds, in tie-break order (DEADLINE: fedcompass)
SPEED_MOMENTUM = 0.9  # FedCompass: weight of a client's newest speed sample (as in APPFL)


@dataclass
class Dispatch:
    seq: int  # dispatch number (the event id)
    client: int
    version: int
    start_s: float
    task_s: float
    steps: int
    status: str  # completed, or the fault that loses the update
    delta: torch.Tensor | None = None
    loss: float = math.nan
    samples: int = 0


@dataclass
class Server:
    """The model, its versions still needed by pending dispatches, and the update buffer."""

    params: torch.Tensor
    version: int = 0
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    buffer: list[Dispatch] = field(default_factory=list)


@dataclass
class Group:
    """A FedCompass arrival group (Li et al., 2024): clients given steps to come back at about
    `expected_s`; the server waits for them until `latest_s`."""

    expected_s: float
    latest_s: float
    waiting: list[int] = field(default_factory=list)  # members not back yet
    arrived: list[Dispatch] = field(default_factory=list)  # members back on time
    closed: bool = False  # aggregated: nobody joins it, members still out are late


@dataclass
class Compass:
    """FedCompass's COMPASS scheduler (Li et al., 2024), as plain state: speeds, arrival
    groups and the general buffer. `speed[c]` estimates client c's seconds per local step from
    its last tasks (time / steps, averaged with weight SPEED_MOMENTUM on the newest); a client
    never back yet has no estimate and trains Q_max steps outside any group (the paper's first
    round), its update applied on arrival. The scheduling rules follow the reference
    implementation (APPFL's CompassScheduler)."""

    q_max: int
    q_min: int
    tolerance: float  # lambda >= 1
    speed: dict[int, float] = field(default_factory=dict)
    group_of: dict[int, int] = field(default_factory=dict)  # client -> its arrival group
    groups: dict[int, Group] = field(default_factory=dict)  # by id, in opening order
    general: list[Dispatch] = field(default_factory=list)  # late updates, for the next group
    opened: int = 0  # groups opened so far (the next group's id)

    @classmethod
    def of(cls, cfg: ServerConfig) -> Compass:
        """Q_max = max_local_steps, Q_min = max(1, floor(q_ratio * Q_max)), lambda."""
        q_min = max(1, math.floor(cfg.q_ratio * cfg.max_local_steps))
        return cls(cfg.max_local_steps, q_min, cfg.tolerance)

    def observe(self, d: Dispatch, t: float) -> None:
        """Update d.client's speed with its task's time per step (d came back at t)."""
        sample = (t - d.start_s) / d.steps
        old = self.speed.get(d.client)
        self.speed[d.client] = sample if old is None else (
            (1 - SPEED_MOMENTUM) * old + SPEED_MOMENTUM * sample)

    def assign(self, client: int, t: float) -> tuple[int, int | None]:
        """The local steps of `client` dispatched at t, and the id of the group it opened
        (None if it joined one, or has no speed estimate yet: then Q_max, no group)."""
        if client not in self.speed:
            return self.q_max, None
        steps = self._join(client, t)
        return (steps, None) if steps is not None else self._open(client, t)

    def _join(self, client: int, t: float) -> int | None:
        """Join the open group that `client` reaches at its expected time with the most steps
        q = floor((expected - t) / speed) in [Q_min, Q_max] (ties: the later group); None if
        no group fits."""
        best, steps = None, -1
        for gid, group in self.groups.items():
            if group.closed:
                continue
            q = math.floor((group.expected_s - t) / self.speed[client])
            if self.q_min <= q <= self.q_max and q >= steps:
                best, steps = gid, q
        if best is None:
            return None
        self.groups[best].waiting.append(client)
        self.group_of[client] = best
        return steps

    def _open(self, client: int, t: float) -> tuple[int, int]:
        """Open a group for `client`. Its steps: the most (up to Q_max) that bring it back by
        the time some group still awaited could return again, i.e. its latest arrival time
        plus Q_max steps of its fastest member; at least Q_min; Q_max if no group is awaited.
        The group expects it at t + q * speed and waits until t + lambda * q * speed."""
        speed, q = self.speed[client], -1
        for group in self.groups.values():
            if group.closed or t >= group.latest_s:
                continue
            members = [*group.waiting, *(d.client for d in group.arrived)]
            fastest = min(self.speed[c] for c in members)
            steps = math.floor((group.latest_s + fastest * self.q_max - t) / speed)
            if steps <= self.q_max:
                q = max(q, steps)
        q = self.q_max if q < 0 else max(q, self.q_min)
        gid = self.opened
        self.opened += 1
        self.groups[gid] = Group(t + q * speed, t + q * speed * self.tolerance, [client])
        self.group_of[client] = gid
        return q, gid

    def arrive(self, d: Dispatch, t: float) -> tuple[list[Dispatch], list[int]]:
        """File update d, back at t. Returns the updates to aggregate now and the clients to
        dispatch again now, in order: a client in no group -> [d] at once, and it goes back;
        late (after its group's latest arrival time) -> the general buffer, and it goes back;
        on time -> it waits for its group, aggregated when its last member is back."""
        gid = self.group_of.pop(d.client, None)
        if gid is None:
            return [d], [d.client]
        group = self.groups[gid]
        group.waiting.remove(d.client)
        if t > group.latest_s or group.closed:
            self.general.append(d)
            self._drop_if_empty(gid)
            return [], [d.client]
        group.arrived.append(d)
        return ([], []) if group.waiting else self.close(gid)

    def lost(self, client: int) -> tuple[list[Dispatch], list[int]]:
        """`client`'s update is lost: its group stops waiting for it (and is aggregated now if
        the others are all back). Returns what `arrive` does."""
        gid = self.group_of.pop(client, None)
        if gid is None:
            return [], []
        group = self.groups[gid]
        group.waiting.remove(client)
        if not group.waiting and group.arrived and not group.closed:
            return self.close(gid)
        self._drop_if_empty(gid)
        return [], []

    def close(self, gid: int) -> tuple[list[Dispatch], list[int]]:
        """Aggregate group gid (its last member is back, or its latest arrival time has come):
        the general buffer's updates and its members', who then go back fastest first (and are
        assigned in that order). Nothing if the group is gone, closed, or nobody is back."""
        group = self.groups.get(gid)
        if group is None or group.closed or not group.arrived:
            return [], []
        updates, self.general = [*self.general, *group.arrived], []
        group.closed = True
        self._drop_if_empty(gid)
        order = sorted(group.arrived, key=lambda d: self.speed[d.client])  # stable
        return updates, [d.client for d in order]

    def _drop_if_empty(self, gid: int) -> None:
        if not self.groups[gid].waiting:
            del self.groups[gid]


@dataclass(frozen=True)
class AsyncSetup:
    rounds: int  # model versions to produce
    eval_every: int
    seeds: SeedTree
    server: ServerConfig
    world: SyncWorld  # availability, devices, liveness, faults (slot = slot_s seconds)
    slot_s: float


class AsyncRun:
    """One asynchronous run: the event queue, the in-flight dispatches and the server."""

    def __init__(self, setup: AsyncSetup, pools: Pools, params: torch.Tensor,
                 logger: RunLogger) -> None:
        self.setup, self.pools, self.logger = setup, pools, logger
        self.server = Server(params, 0, {0: params})
        self.queue: list[tuple[float, int, int]] = []
        self.flight: dict[int, Dispatch] = {}
        self.pending: dict[int, list[Dispatch]] = {}  # version -> dispatches not yet trained
        self.busy: set[int] = set()
        self.seq, self.slot, self.online = 0, -1, np.zeros(0, np.int64)
        self.train_calls, self.retry_at, self.version_slot = 0, -1.0, 0
        self.rows: list[Dispatch] = []  # arrivals since the last logged version
        fedcompass = setup.server.mode == "fedcompass"
        self.compass = Compass.of(setup.server) if fedcompass else None

    # -- the queue ---------------------------------------------------------------------

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
            self.logger.append(event_rows(self.server.version, t, events))

    # -- dispatch ------------------------------------------------------------------------

    def fill(self, t: float) -> None:
        """Dispatch online idle clients until `concurrency` are busy (training, or waiting
        for their FedCompass group; retry next slot if none is online)."""
        free = self.setup.server.concurrency - len(self.busy)
        if free <= 0:
            return
        idle = np.setdiff1d(self.online, np.fromiter(self.busy, np.int64, len(self.busy)))
        rng = self.setup.seeds.rng("async_dispatch", self.seq)
        chosen = np.sort(rng.choice(idle, size=min(free, idle.size), replace=False))
        for client in chosen:
            self.dispatch(int(client), t)
        retry = (self.slot + 1) * self.setup.slot_s
        if len(self.busy) < self.setup.server.concurrency and self.retry_at < retry:
            self.retry_at = retry  # nobody idle online: try again next slot
            self.push(retry, TICK, -1)

    def dispatch(self, client: int, t: float) -> None:
        world, seq = self.setup.world, self.seq
        self.seq += 1
        ids = np.array([client])
        faults = round_faults(world.cfg.failures, ids, self.setup.seeds.rng("faults", seq))
        if self.compass is None:
            steps = int(world.steps(ids, seq)[0])
        else:  # the server assigns the steps; a group it opens is aggregated by its deadline
            steps, opened = self.compass.assign(client, t)
            if opened is not None:
                self.push(self.compass.groups[opened].latest_s, DEADLINE, opened)
        up = world.upload if faults.reports[0] else 0
        task = float(world.devices.task_time(ids, np.array([steps]), world.transfer, up)[0])
        status = str(faults.status(COMPLETED)[0])
        d = Dispatch(seq, client, self.server.version, t, task, steps, status)
        self.flight[seq] = d
        self.busy.add(client)
        if status == COMPLETED:
            self.pending.setdefault(d.version, []).append(d)
        else:
            self.log_events(t, faults.events(ids))
        self.push(t + task, ARRIVAL, seq)

    # -- training --------------------------------------------------------------------------

    def train(self, version: int) -> None:
        """Every pending dispatch of `version`, in one call per pool (vmapped)."""
        batch = sorted(self.pending.pop(version), key=lambda d: d.client)
        ids = np.array([d.client for d in batch], dtype=np.int64)
        self.train_calls += 1
        results = self.pools.train(self.server.snapshots[version], ids, self.train_calls,
                                   False, None, np.array([d.steps for d in batch]))
        deltas = torch.cat([r.updates.deltas for r in results])
        losses = torch.cat([r.updates.losses for r in results])
        samples = torch.cat([r.updates.num_samples for r in results])
        for i, d in enumerate(batch):  # results come back in id order, like `batch`
            d.delta, d.loss, d.samples = deltas[i], float(losses[i]), int(samples[i])

    def release(self, version: int) -> None:
        still = {d.version for d in self.flight.values()} | {self.server.version}
        if version not in still:
            self.server.snapshots.pop(version, None)


def _staleness(d: Dispatch, server: Server, cfg: ServerConfig) -> float:
    s = cfg.staleness
    return float(staleness_weight(s.kind, server.version - d.version, s.a, s.b))


def check_compass(setup: AsyncSetup) -> None:
    """FedCompass assigns every dispatch's local steps and the pools train exactly those: the
    config must not set step counts of its own, and every client's `local_epochs` of batches
    must hold Q_max steps (a step budget only cuts that plan). One-line ConfigErrors."""
    world, q_max = setup.world, setup.server.max_local_steps
    if world.cfg.training.max_local_steps is not None or world.anarchic:
        raise ConfigError("server.mode=fedcompass assigns the local steps: it takes no "
                          "training.max_local_steps and no anarchic availability")
    caps = world.steps(np.arange(world.num_clients), 0)  # local_epochs of batches
    c = int(np.argmin(caps))
    if caps[c] < q_max:
        raise ConfigError(
            f"server.max_local_steps={q_max} exceeds the {int(caps[c])} steps "
            f"training.local_epochs={world.hp.epochs} give client {c} ({int(world.sizes[c])} "
            f"samples, batch {world.hp.batch_size}): raise training.local_epochs or lower "
            "server.max_local_steps")


def compass_step(server: Server, updates: list[Dispatch], cfg: ServerConfig,
                 total_samples: float) -> None:
    """FedCompass's server update (Li et al., 2024) over a group's updates and the late ones
    buffered since (or one first-task update alone): x <- x + alpha * sum_i s(tau_i) n_i / n
    delta_i, tau_i = versions since update i was dispatched, n = all clients' samples.
    `updates` come ordered by (client, dispatch)."""
    coef = torch.tensor([cfg.alpha * _staleness(d, server, cfg) * d.samples / total_samples
                         for d in updates], dtype=server.params.dtype)
    deltas = torch.stack([d.delta for d in updates])
    server.params = server.params + (coef[:, None] * deltas).sum(0)
    server.version += 1
    server.snapshots[server.version] = server.params


def aggregate(run: AsyncRun, cfg: ServerConfig) -> bool:
    """Apply the server rule to the buffer if it is due; True if a new version was made."""
    server, buffer = run.server, run.server.buffer
    if not buffer:
        return False
    if cfg.mode == "fedasync":
        d = buffer[0]
        a = cfg.alpha * _staleness(d, server, cfg)
        client_model = server.snapshots[d.version] + d.delta
        server.params = (1 - a) * server.params + a * client_model
    elif cfg.mode == "fedbuff":
        if len(buffer) < cfg.buffer:
            return False
        scaled = torch.stack([_staleness(d, server, cfg) * d.delta for d in buffer])
        server.params = server.params + cfg.lr * scaled.mean(dim=0)
    else:  # fedfix: called on its ticks
        n = torch.tensor([float(d.samples) for d in buffer])
        deltas = torch.stack([d.delta for d in buffer])
        server.params = server.params + cfg.lr * (n[:, None] * deltas).sum(0) / n.sum()
    server.version += 1
    server.snapshots[server.version] = server.params
    server.buffer = []
    return True


def async_rounds(setup: AsyncSetup, pools: Pools, params: torch.Tensor, evaluator: Evaluator,
                 logger: RunLogger, progress: RoundProgress) -> LoopResult:
    """Run events until `rounds` model versions exist; log one rounds row per version."""
    if setup.server.mode == "fedcompass":
        check_compass(setup)
    run, cfg = AsyncRun(setup, pools, params, logger), setup.server
    run.advance(0.0)
    run.fill(0.0)
    if cfg.mode == "fedfix":
        run.push(cfg.interval_s, TICK, -2)
    accuracies, start = [], time.perf_counter()
    t_last = start
    while run.server.version < setup.rounds and run.queue and not _stalled(run):
        t, kind, ident = heapq.heappop(run.queue)
        run.advance(t)
        made = _EVENTS[kind, run.compass is not None](run, t, ident)
        if made:
            acc = _log_version(run, t, evaluator, (t_last, start), progress)
            accuracies.append(acc)
            check_finite(run.server.params, "the global model is not finite after version "
                         f"{run.server.version - 1}")
            t_last, run.version_slot = time.perf_counter(), run.slot
        run.fill(t)
    evaluated = [a for a in accuracies if a is not MISSING] or [math.nan]
    return LoopResult(run.server.params, run.server.version, evaluated[-1], max(evaluated),
                      time.perf_counter() - start, run.seq)


STALL_SLOTS = 10_000


def _stalled(run: AsyncRun) -> bool:
    """Nobody in flight and no new version for STALL_SLOTS slots: every client is gone
    (crash-stop, churn). The run ends with the versions it made."""
    return not run.flight and run.slot - run.version_slot > STALL_SLOTS


def _arrival(run: AsyncRun, t: float, seq: int) -> bool:
    d = run.flight.pop(seq)
    run.busy.discard(d.client)
    if d.status != COMPLETED:
        run.release(d.version)
        return False
    if d.delta is None:
        run.train(d.version)
    run.rows.append(d)
    run.server.buffer.append(d)
    made = run.setup.server.mode != "fedfix" and aggregate(run, run.setup.server)
    run.release(d.version)
    return made


def _tick(run: AsyncRun, t: float, ident: int) -> bool:
    if ident != -2:  # a retry of dispatching: `fill` runs after every event
        return False
    run.push(t + run.setup.server.interval_s, TICK, -2)
    return aggregate(run, run.setup.server)


def _compass_arrival(run: AsyncRun, t: float, seq: int) -> bool:
    """A FedCompass dispatch is back (or its loss is noticed): the scheduler files it."""
    d = run.flight.pop(seq)
    if d.status != COMPLETED:
        run.busy.discard(d.client)
        run.release(d.version)
        return _compass_apply(run, t, *run.compass.lost(d.client))
    if d.delta is None:
        run.train(d.version)
    run.release(d.version)
    run.compass.observe(d, t)
    return _compass_apply(run, t, *run.compass.arrive(d, t))


def _deadline(run: AsyncRun, t: float, gid: int) -> bool:
    """A FedCompass group's latest arrival time: aggregate whoever of it is back."""
    return _compass_apply(run, t, *run.compass.close(gid))


def _compass_apply(run: AsyncRun, t: float, updates: list[Dispatch],
                   clients: list[int]) -> bool:
    """Aggregate `updates` (if any) into a new version, then dispatch `clients` again, in
    order (one offline now leaves; `fill` takes another). True if a version was made."""
    if updates:
        updates = sorted(updates, key=lambda d: (d.client, d.seq))
        total = float(run.setup.world.sizes.sum())
        compass_step(run.server, updates, run.setup.server, total)
        run.rows = updates
    for client in clients:
        if np.any(run.online == client):
            run.dispatch(client, t)
        else:
            run.busy.discard(client)
    return bool(updates)


_EVENTS = {(ARRIVAL, False): _arrival, (TICK, False): _tick,
           (ARRIVAL, True): _compass_arrival, (TICK, True): _tick, (DEADLINE, True): _deadline}


def _log_version(run: AsyncRun, t: float, evaluator: Evaluator, clocks,
                 progress: RoundProgress) -> float:
    """The rounds row of the version just made, and its arrivals' client rows."""
    t_last, start = clocks
    now = time.perf_counter()
    v = run.server.version - 1
    due = run.server.version == run.setup.rounds or (
        run.setup.eval_every > 0 and run.server.version % run.setup.eval_every == 0)
    loss, acc = evaluator(run.server.params) if due else (MISSING, MISSING)
    rows = run.rows
    run.rows = []
    run.logger.append(_client_rows(v, rows, run))
    losses = np.array([d.loss for d in rows])
    run.logger.append(RoundRows(
        round=[v], num_selected=[len(rows)], num_updates=[len(rows)], num_byzantine=[0],
        train_loss=[float(losses.mean()) if rows else MISSING], test_loss=[loss],
        test_accuracy=[acc], mean_update_norm=[MISSING], round_wall_s=[now - t_last],
        train_wall_s=[MISSING], aggregate_wall_s=[MISSING], eval_wall_s=[MISSING],
        wall_time_s=[now - start], client_updates_per_s=[len(rows) / max(now - t_last, 1e-9)],
        virtual_time=[t],
        bytes_communicated=[len(rows) * (run.setup.world.transfer + run.setup.world.upload)],
    ))
    progress.update(acc, float(losses.mean()) if rows else MISSING,
                    len(rows) / max(now - t_last, 1e-9))
    return acc


def _client_rows(v: int, rows: list[Dispatch], run: AsyncRun) -> ClientRows:
    ids = np.array([d.client for d in rows], dtype=np.int64)
    norms = [float(torch.linalg.vector_norm(d.delta)) for d in rows]
    return ClientRows(
        round=np.full(ids.size, v), client_id=ids, pool=pool_of(run.pools.bounds, ids),
        status=np.full(ids.size, COMPLETED), num_samples=np.array([d.samples for d in rows]),
        local_steps=np.array([d.steps for d in rows]),
        train_loss=np.array([d.loss for d in rows]), update_norm=np.array(norms),
        weight=np.ones(ids.size), pool_train_s=np.full(ids.size, MISSING, dtype=object),
        byzantine=np.zeros(ids.size, dtype=bool), task_s=np.array([d.task_s for d in rows]),
        staleness=np.array([v - d.version for d in rows]),
        bytes_up=np.full(ids.size, run.setup.world.upload),
    )
