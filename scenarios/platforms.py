"""Aggregation platforms (registry PLATFORMS): how long the server takes, in virtual time, to
turn a synchronous round's arrivals into the global model, and how many aggregator-seconds
it holds doing so. A timing model only: the numerical sum is always the fixed id tree of
engine/core/tree.py, so the model's bits do not depend on the platform.

A platform is a factory of its parameters returning a `Platform`:
`timing(arrivals, update_bytes, close_s) -> Timing`, where `arrivals` are the kept updates'
arrival times in seconds from the round's start, `update_bytes` one update's wire size and
`close_s` the round's close (the last kept arrival, or the deadline). Pure functions of
their inputs.

- `always_on`: one aggregator that is up the whole round (a "serverful" FL server) and adds
  the updates one by one as they arrive; its seconds count from the round's start.
- `lifl`: LIFL's serverless hierarchical aggregation (Qi, Ramakrishnan & Lee, 2024, "LIFL:
  A Lightweight, Event-driven Serverless Platform for Federated Learning", MLSys 2024).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Literal, NamedTuple

import numpy as np
from pydantic import Field

from engine.core.plugins import Registry

Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]


class Timing(NamedTuple):
    latency_s: float  # the last kept arrival -> the global model is ready
    aggregator_s: float  # aggregator-seconds charged for the round (resource use)
    instances: int  # aggregator instances started in the round


@dataclass(frozen=True)
class Platform:
    timing: Callable[[np.ndarray, int, float], Timing]
    modelled: bool = True  # False: the round ends at its close, no columns are logged


def _untimed(arrivals: np.ndarray, update_bytes: int, close_s: float) -> Timing:
    return Timing(0.0, 0.0, 0)


def none() -> Platform:
    """Not modelled: the round ends at its close (the last kept report), as without a
    platform; the rounds' aggregation columns are null."""
    return Platform(_untimed, modelled=False)


def _sequential(t: float, arrivals: np.ndarray, add_s: float) -> float:
    """An aggregator free from `t` adds each arrival (sorted) as it comes: the time it is done."""
    for a in arrivals:
        t = max(t, float(a)) + add_s
    return t


def _always_on(aggregate_bps: float, arrivals: np.ndarray, update_bytes: int,
               close_s: float) -> Timing:
    arrivals = np.sort(np.asarray(arrivals, np.float64))
    if arrivals.size == 0:
        return Timing(0.0, float(close_s), 1)
    ready = _sequential(0.0, arrivals, update_bytes / aggregate_bps)
    return Timing(ready - float(arrivals[-1]), max(ready, float(close_s)), 1)


def always_on(aggregate_bps: Positive = 1e9) -> Platform:
    """One always-on aggregator (the serverful baseline LIFL compares with): it adds each
    update when it arrives, one at a time (`update_bytes / aggregate_bps` seconds each), and
    it is held from the round's start until the model is ready."""
    return Platform(partial(_always_on, aggregate_bps))


@dataclass(frozen=True)
class _Lifl:
    fan_in: int
    per_node: int
    placement: str
    cold_start_s: float
    aggregate_bps: float
    shm_s: float
    network_bps: float
    network_latency_s: float

    def __call__(self, arrivals: np.ndarray, update_bytes: int, close_s: float) -> Timing:
        arrivals = np.sort(np.asarray(arrivals, np.float64))
        k = arrivals.size
        if k == 0:
            return Timing(0.0, 0.0, 0)
        add_s = update_bytes / self.aggregate_bps
        hop_s = self.network_latency_s + update_bytes / self.network_bps
        leaves = -(-k // self.fan_in)
        nodes = -(-leaves // self.per_node)
        node = [j // self.per_node if self.placement == "pack" else j % nodes
                for j in range(leaves)]
        # each leaf: spun up (cold) when its first update arrives, adds its fan_in updates
        done = [_sequential(float(arrivals[j * self.fan_in]) + self.cold_start_s,
                            arrivals[j * self.fan_in:(j + 1) * self.fan_in], add_s)
                for j in range(leaves)]
        busy = leaves * self.cold_start_s + k * add_s  # CPU-seconds: starts, leaf adds
        level = list(range(leaves))  # instances holding the level's partial aggregates
        while len(level) > 1:
            parents = []
            for g in range(0, len(level), self.fan_in):
                group = level[g:g + self.fan_in]
                first = min(group, key=lambda i: (done[i], i))  # reused as the parent (warm)
                hops = {i: self.shm_s if node[i] == node[first] else hop_s
                        for i in group if i != first}
                # the others' aggregates reach it over shared memory or the network
                at = np.sort([done[i] + h for i, h in hops.items()])
                done[first] = _sequential(done[first], at, add_s)
                busy += sum(hops.values()) + len(hops) * add_s
                parents.append(first)
            level = parents
        root = level[0]
        return Timing(done[root] - float(arrivals[-1]), busy, leaves)


def lifl(fan_in: Annotated[int, Field(ge=2)] = 4, per_node: Annotated[int, Field(ge=1)] = 4,
         placement: Literal["pack", "spread"] = "pack", cold_start_s: NonNegative = 0.1,
         aggregate_bps: Positive = 1e9, shm_s: NonNegative = 1e-4,
         network_bps: Positive = 1.25e9, network_latency_s: NonNegative = 1e-3) -> Platform:
    """LIFL (Qi, Ramakrishnan & Lee, 2024, "LIFL: A Lightweight, Event-driven Serverless
    Platform for Federated Learning"): hierarchical aggregation by serverless aggregators,
    modelled in virtual time from the round's arrivals.

    - Elastic scaling, event-driven: the updates, in arrival order, go in groups of `fan_in`
      to ceil(K / fan_in) leaf aggregators; a leaf is started when its first update arrives
      (a cold start of `cold_start_s`) and adds each update as it comes (eager aggregation,
      `update_bytes / aggregate_bps` seconds per update).
    - Hierarchy of fan-in `fan_in`: consecutive aggregators of a level are grouped by
      `fan_in`; the member that finishes first is reused as the group's parent (LIFL's
      aggregator reuse: a warm instance, no start cost) and adds the others' aggregates as
      they reach it, up to the root, whose result is the global model.
    - Locality-aware placement: at most `per_node` leaves per node; `pack` fills a node
      before the next (siblings share a node), `spread` deals them round-robin over the same
      number of nodes (the placement LIFL improves on). An aggregate handed to a parent on
      the same node costs `shm_s` (shared memory, zero-copy); across nodes,
      `network_latency_s + update_bytes / network_bps`.
    - Resources (`Timing.aggregator_s`): the CPU-seconds the aggregators spend, each cold
      start, each add and each hand-over; an event-driven instance waiting for its next
      update holds no CPU (LIFL charges resources per event, unlike the always-on server,
      charged for the whole round).

    Departures: the platform's own costs (eBPF sidecar, message queues, gateway) are the two
    hop constants; no pre-warmed pool and no keep-alive across rounds (each round's leaves
    start cold); the hierarchy is planned from the round's number of kept updates (LIFL
    plans it from the expected arrivals); a node's CPU is not shared (aggregators on one node
    run in parallel); the memory an idle instance holds is not counted.
    """
    return Platform(_Lifl(fan_in, per_node, placement, cold_start_s, aggregate_bps, shm_s,
                          network_bps, network_latency_s))


PLATFORMS: Registry[Platform] = Registry("aggregation platform", {
    "none": none, "always_on": always_on, "lifl": lifl,
})
