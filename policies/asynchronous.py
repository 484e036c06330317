"""Server rules (registry SERVER_RULES): when the server aggregates, and what it aggregates.

`sync` is the synchronous protocol: rounds of K selected clients (engine/loops/federated.py).
The others are asynchronous (engine/loops/async_fl.py runs them in virtual time). A rule is a
small object of its parameters whose methods are pure functions of an explicit state: on each
event (an update arrives, one is lost, a periodic tick, a group's deadline) it returns the new
state and a `Decision`: the arrivals to aggregate now (a new model version) and the clients to
dispatch again. `updates(batch, ...)` turns the batch into the `Updates` that the run's
aggregation chain reduces (any reduction, any server optimizer), and a scale for its step:

    new model = model + scale * chain(updates)

With the default chain (fedavg: weighted mean, server SGD at 1) each rule is its paper's:

    FedAsync (Xie, Koyejo & Gupta, 2019, "Asynchronous Federated Optimization"): every arrival,
        x <- (1 - a) x + a x_i with a = alpha s(tau), x_i = x_dispatch + delta_i. As a step:
        x + a (x_i - x): one update, x_i - x, scale a.
    FedBuff (Nguyen et al., 2022, "Federated Learning with Buffered Asynchronous Aggregation"):
        every K arrivals, x <- x + lr (1/K) sum_i s(tau_i) delta_i: updates s(tau_i) delta_i with
        weight 1 each (the mean), scale lr.
    FedFix (Fraboni, Vidal, Kameni & Lorenzi, 2023, "A General Theory for Federated
        Optimization with Asynchronous and Heterogeneous Clients Updates"): every interval_s
        of virtual time, x <- x + lr sum_i n_i delta_i / sum_i n_i over the updates received in
        the interval: updates delta_i with weight n_i, scale lr.
    FedCompass (Li, Chaturvedi, He, Chen, Singh, Kindratenko, Huerta, Kim & Madduri, ICLR 2024,
        "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client Devices
        using a Computing Power Aware Scheduler", arXiv 2309.14675), semi-asynchronous: the
        COMPASS scheduler gives each client Q in [Q_min, Q_max] local steps from its measured
        speed so that clients come back in arrival groups; a group is aggregated when its last
        member is back or at its latest arrival time, with the late updates buffered since:
        x <- x + alpha sum_i s(tau_i) n_i / n delta_i (n: every client's samples): updates
        s(tau_i) delta_i with weight n_i, scale alpha sum_i n_i / n.

tau_i is the number of versions made since update i's model was sent; every update carries it
(`Updates.staleness`), so a staleness-aware rule can be written as a stage. Rows are keyed by
their dispatch number, unique even when one client returns twice into one buffer (the tree
sums and tie-breaks need unique keys); the clients table keeps the client ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple

import numpy as np
import torch
from pydantic import Field

from engine.core.plans import Dispatch
from engine.core.plugins import Registry
from engine.core.updates import Updates
from policies.staleness import STALENESS, Staleness, constant, staleness_weight

SPEED_MOMENTUM = 0.9  # FedCompass: weight of a client's newest speed sample (as in APPFL)
Fraction = Annotated[float, Field(gt=0, le=1)]
StalenessFn = Annotated[Staleness, STALENESS]
ModelAt = Callable[[int], torch.Tensor]  # version -> the model the server sent then


class Decision(NamedTuple):
    state: Any
    aggregate: tuple[Dispatch, ...] = ()  # updates to aggregate now, into a new version
    dispatch: tuple[int, ...] = ()  # clients to send out again now, in this order


class ServerRule:
    """The synchronous protocol (`sync`) and the defaults of the asynchronous rules."""

    asynchronous = False
    holds_clients = False  # clients stay busy after their update arrives (until dispatched)
    assigns_steps = False  # the rule, not the config, gives each dispatch its local steps
    interval_s: float | None = None  # a periodic tick, every interval_s virtual seconds
    batch: int | None = None  # updates in every server step, when the rule fixes it

    def init(self) -> Any:
        return ()

    def assign(self, state: Any, client: int, t: float) -> tuple[Any, int | None,
                                                                 tuple[float, int] | None]:
        """(state, local steps of `client` dispatched at t, a deadline (time, id) to schedule);
        None steps: the config's."""
        return state, None, None

    def arrive(self, state: Any, d: Dispatch, t: float) -> Decision:
        return Decision(state)

    def lost(self, state: Any, d: Dispatch, t: float) -> Decision:
        return Decision(state)

    def tick(self, state: Any, t: float) -> Decision:
        return Decision(state)

    def deadline(self, state: Any, ident: int, t: float) -> Decision:
        return Decision(state)

    def updates(self, batch: tuple[Dispatch, ...], version: int, model_at: ModelAt,
                total_samples: float) -> tuple[Updates, float]:
        raise NotImplementedError


def _stale(fn: Staleness, batch: tuple[Dispatch, ...], version: int) -> np.ndarray:
    return staleness_weight(fn, np.array([version - d.version for d in batch]))


def batch_updates(batch: tuple[Dispatch, ...], version: int, deltas: torch.Tensor,
                  weights: torch.Tensor) -> Updates:
    """The batch as Updates ordered by dispatch number, with each update's staleness, label
    counts and Fisher (when the pools computed them)."""
    order = sorted(range(len(batch)), key=lambda i: batch[i].seq)
    idx = torch.tensor(order, dtype=torch.int64)
    return Updates(
        deltas=deltas[idx], weights=weights[idx],
        client_ids=torch.tensor([batch[i].seq for i in order], dtype=torch.int64),
        losses=torch.tensor([batch[i].loss for i in order], dtype=torch.float32),
        num_samples=torch.tensor([batch[i].samples for i in order], dtype=torch.int64),
        steps=torch.tensor([batch[i].steps for i in order], dtype=torch.int64),
        label_counts=_stacked([batch[i].label_counts for i in order]),
        fisher=_stacked([batch[i].fisher for i in order]),
        staleness=torch.tensor([version - batch[i].version for i in order], dtype=torch.int64),
    )


def _stacked(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The batch's rows of a per-client column, if the pools returned it."""
    return None if any(r is None for r in rows) else torch.stack(rows)


def _stack(batch: tuple[Dispatch, ...]) -> torch.Tensor:
    return torch.stack([d.delta for d in batch])


@dataclass(frozen=True)
class FedAsync(ServerRule):
    alpha: float
    staleness: Staleness
    asynchronous = True
    batch = 1

    def arrive(self, state, d, t):
        return Decision(state, (d,))

    def updates(self, batch, version, model_at, total_samples):
        (d,) = batch
        a = self.alpha * float(_stale(self.staleness, batch, version)[0])
        towards = model_at(d.version) + d.delta - model_at(version)  # x_i - x
        return batch_updates(batch, version, towards[None], torch.ones(1)), a


@dataclass(frozen=True)
class FedBuff(ServerRule):
    buffer: int
    lr: float
    staleness: Staleness
    asynchronous = True

    @property
    def batch(self) -> int:
        return self.buffer

    def arrive(self, state, d, t):
        state = (*state, d)
        return Decision((), state) if len(state) >= self.buffer else Decision(state)

    def updates(self, batch, version, model_at, total_samples):
        s = torch.from_numpy(_stale(self.staleness, batch, version)).float()
        return batch_updates(batch, version, s[:, None] * _stack(batch),
                             torch.ones(len(batch))), self.lr


@dataclass(frozen=True)
class FedFix(ServerRule):
    lr: float
    interval_s: float | None = None  # ServerRule's periodic tick, set by fedfix()
    asynchronous = True

    def arrive(self, state, d, t):
        return Decision((*state, d))

    def tick(self, state, t):
        return Decision((), state)

    def updates(self, batch, version, model_at, total_samples):
        n = torch.tensor([float(d.samples) for d in batch])
        return batch_updates(batch, version, _stack(batch), n), self.lr


@dataclass(frozen=True)
class FedCompass(ServerRule):
    """The state is the COMPASS scheduler (class Compass): speeds, groups, general buffer."""

    max_local_steps: int
    q_ratio: float
    tolerance: float
    alpha: float
    staleness: Staleness
    asynchronous = True
    holds_clients = True
    assigns_steps = True

    def init(self):
        return Compass.of(self.max_local_steps, self.q_ratio, self.tolerance)

    def assign(self, state, client, t):
        steps, opened = state.assign(client, t)
        deadline = None if opened is None else (state.groups[opened].latest_s, opened)
        return state, steps, deadline

    def arrive(self, state, d, t):
        state.observe(d, t)
        return Decision(state, *map(tuple, state.arrive(d, t)))

    def lost(self, state, d, t):
        return Decision(state, *map(tuple, state.lost(d.client)))

    def deadline(self, state, ident, t):
        return Decision(state, *map(tuple, state.close(ident)))

    def updates(self, batch, version, model_at, total_samples):
        s = torch.from_numpy(_stale(self.staleness, batch, version)).float()
        n = torch.tensor([float(d.samples) for d in batch])
        scale = self.alpha * float(n.sum()) / total_samples
        return batch_updates(batch, version, s[:, None] * _stack(batch), n), scale


def sync() -> ServerRule:
    """Synchronous rounds: K clients selected, trained, and aggregated together (FedAvg's
    protocol, McMahan et al., 2017)."""
    return ServerRule()


def fedasync(alpha: Fraction = 0.6, staleness: StalenessFn = constant) -> ServerRule:
    """FedAsync (Xie et al., 2019): every arrival is mixed into the model with weight
    alpha s(tau)."""
    return FedAsync(alpha, staleness)


def fedbuff(buffer: Annotated[int, Field(ge=1)] = 10, lr: Annotated[float, Field(gt=0)] = 1.0,
            staleness: StalenessFn = constant) -> ServerRule:
    """FedBuff (Nguyen et al., 2022): aggregate every `buffer` arrivals, each scaled by
    s(tau) (the paper's s(tau) = 1 / sqrt(1 + tau) is `staleness: sqrt`)."""
    return FedBuff(buffer, lr, staleness)


def fedfix(interval_s: Annotated[float, Field(gt=0)] = 1.0,
           lr: Annotated[float, Field(gt=0)] = 1.0) -> ServerRule:
    """FedFix (Fraboni et al., 2023): aggregate what arrived in every interval of
    `interval_s` virtual seconds, weighted by samples."""
    return FedFix(lr, interval_s)


def fedcompass(max_local_steps: Annotated[int, Field(ge=1)] = 20,
               q_ratio: Fraction = 0.2,
               tolerance: Annotated[float, Field(ge=1)] = 1.5,
               alpha: Fraction = 0.6, staleness: StalenessFn = constant) -> ServerRule:
    """FedCompass (Li et al., 2024): Q_max = max_local_steps, Q_min = max(1, floor(q_ratio *
    Q_max)); a group opened at t for Q steps of speed v waits until t + tolerance * Q * v; the
    server step is alpha sum_i s(tau_i) n_i / n delta_i. Needs `training.local_epochs` worth
    of Q_max batches on every client: the scheduler assigns the steps."""
    return FedCompass(max_local_steps, q_ratio, tolerance, alpha, staleness)


SERVER_RULES: Registry[ServerRule] = Registry("server mode", {
    "sync": sync, "fedasync": fedasync, "fedbuff": fedbuff, "fedfix": fedfix,
    "fedcompass": fedcompass,
})


# ------------------------------------------------------------------ the COMPASS scheduler


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
    def of(cls, max_local_steps: int, q_ratio: float, tolerance: float) -> Compass:
        """Q_max = max_local_steps, Q_min = max(1, floor(q_ratio * Q_max)), lambda."""
        q_min = max(1, math.floor(q_ratio * max_local_steps))
        return cls(max_local_steps, q_min, tolerance)

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
