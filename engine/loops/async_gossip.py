"""Asynchronous gossip in virtual time: Poisson clocks per edge (pairwise averaging) and per
peer (one local SGD step), processed in (time, kind, id) order.

Each unit of virtual time [r, r + 1) is one row of the rounds table. Its events are cut into
conflict-free levels (scenarios/clocks.py); every level is one call per pool, and a pool's
cross-pool exchanges of a level are finished by its next call, with the partner's row read
from the object store. The calls of a whole unit are submitted at once (each depends only on
the previous level's exports), so Ray pipelines them; the result is that of processing the
events one by one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.backends.runtime import Pools, pool_of
from engine.compute.evaluation import Evaluator
from engine.compute.peers import PeerPool, PeerScores
from engine.loops.decentralized import (
    GossipSetup,
    PeerEvaluation,
    check_consensus,
    consensus_summary,
    peer_accuracy,
    peer_rows,
)
from engine.loops.skeleton import LoopResult, Round, Schedule, Scores, Timing, run_rounds
from engine.records.logs import MISSING, RoundRows, RunLogger
from engine.records.progress import RoundProgress
from scenarios.clocks import (
    GOSSIP,
    STEP,
    Events,
    conflict_free_levels,
    poisson_events,
    undirected_edges,
)
from scenarios.network import Network


@dataclass(frozen=True)
class Rates:
    edge: float  # gossip exchanges per edge per unit of virtual time
    step: float  # local SGD steps per peer per unit of virtual time


def _level_args(events: Events, sel: np.ndarray, bounds: np.ndarray):
    """Per pool: (steps, local pairs [k, 2], cross ends [c, 2], exports per pool)."""
    steps = events.a[sel & (events.kind == STEP)]
    gossip = sel & (events.kind == GOSSIP)
    a, b = events.a[gossip], events.b[gossip]
    pa, pb = pool_of(bounds, a), pool_of(bounds, b)
    n = bounds.size - 1
    out = []
    for p in range(n):
        local = (pa == p) & (pb == p)
        out_a, out_b = (pa == p) & (pb != p), (pb == p) & (pa != p)  # one end here
        cross = np.concatenate([np.stack([a[out_a], b[out_a]], 1),
                                np.stack([b[out_b], a[out_b]], 1)])
        partner_pool = pool_of(bounds, cross[:, 1])
        exports = [np.sort(cross[partner_pool == q, 0]) for q in range(n)]
        out.append((np.sort(steps[pool_of(bounds, steps) == p]), np.stack([a[local], b[local]], 1),
                    cross, exports))
    return out


def async_unit(pools: Pools, events: Events, shift: np.ndarray | None):
    """Run one unit's events on the pools; returns the pools' consensus sums."""
    levels = conflict_free_levels(events, int(pools.bounds[-1]))
    n, carried, sent = pools.num_pools, None, None
    for level in range(int(levels.max()) + 1 if levels.size else 0):
        args = _level_args(events, levels == level, pools.bounds)
        calls = [(*a, *_received(carried, sent, p)) for p, a in enumerate(args)]
        carried = pools.map(PeerPool.async_level, calls, num_returns=1 + n)
        sent = [a[3] for a in args]
    return pools.get(pools.map(PeerPool.async_flush, [(shift, *_received(carried, sent, p))
                                                for p in range(n)]))


def _received(carried, sent, p: int) -> list:
    """The exports addressed to pool p by the previous level's calls."""
    if carried is None:
        return []
    return [carried[q][1 + p] for q in range(len(carried)) if sent[q][p].size]


class AsyncGossipUnits:
    """Asynchronous gossip: a "round" is one unit of virtual time [r, r + 1) of Poisson
    events (pairwise averages and local steps), then consensus sums and the final merge."""

    def __init__(self, setup: GossipSetup, rates: Rates, pools: Pools, network: Network,
                 evaluator: Evaluator, logger: RunLogger) -> None:
        self.setup, self.rates, self.pools, self.network = setup, rates, pools, network
        self.logger, self.scores = logger, PeerEvaluation(setup, pools, evaluator)
        self.shift: np.ndarray | None = None
        self.mean, self.consensus_distance, self.events = None, math.nan, None

    def step(self, r: int, last: bool) -> Round:
        t0, n = time.perf_counter(), int(self.pools.bounds[-1])
        edges = undirected_edges(self.network.graph(r))
        self.events = poisson_events(edges, n, self.rates.edge, self.rates.step, float(r),
                                     float(r + 1), self.setup.seeds.rng("clock", r))
        stats = async_unit(self.pools, self.events, self.shift)
        self.mean, self.consensus_distance = consensus_summary(stats, self.shift)
        if self.setup.final_merge and last:
            self.pools.get(self.pools.map(PeerPool.set_models,
                                          [(self.mean,)] * self.pools.num_pools))
            self.consensus_distance = 0.0
        return Round(int((self.events.kind == STEP).sum()), MISSING, time.perf_counter() - t0,
                     MISSING)

    def evaluate(self, r: int) -> Scores:
        return self.scores(self.mean, r)

    def record(self, r: int, done: Round, scores: Scores, timing: Timing) -> None:
        _log_unit(self.logger, self.setup, r, self.events, self.scores.taken(), scores, done,
                  self.consensus_distance, timing, self.pools.bounds)

    def check(self, r: int) -> None:
        check_consensus(self.mean, self.consensus_distance, r)
        self.shift = self.mean.astype(np.float32)  # the next reference point (as pools use)

    def model(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.mean, dtype=np.float32))


def async_gossip_units(setup: GossipSetup, rates: Rates, pools: Pools, network: Network,
                       evaluator: Evaluator, logger: RunLogger,
                       progress: RoundProgress) -> LoopResult:
    loop = AsyncGossipUnits(setup, rates, pools, network, evaluator, logger)
    return run_rounds(loop, Schedule(setup.rounds, setup.eval_every), progress)


def _log_unit(logger: RunLogger, setup: GossipSetup, r: int, events: Events,
              peers: PeerScores | None, scores: Scores, done: Round, distance: float,
              timing: Timing, bounds: np.ndarray) -> None:
    if peers is not None:
        logger.append(peer_rows(r, peers, bounds, []))
    steps = done.updates
    messages = 2 * int((events.kind == GOSSIP).sum())  # a pairwise average: one each way
    logger.append(RoundRows(
        round=[r], num_selected=[steps], num_updates=[steps],
        num_byzantine=[setup.byzantine.size], train_loss=[MISSING],
        test_loss=[scores.loss], test_accuracy=[scores.accuracy],
        mean_update_norm=[MISSING], round_wall_s=[timing.round_s],
        train_wall_s=[done.train_s], aggregate_wall_s=[MISSING], eval_wall_s=[timing.eval_s],
        wall_time_s=[timing.wall_s], client_updates_per_s=[steps / max(timing.round_s, 1e-9)],
        consensus_distance=[distance],
        **peer_accuracy(None if peers is None else peers.test_accuracy),
        gossip_messages=[messages], virtual_time=[float(r + 1)],
        bytes_communicated=[messages * setup.model_bytes],
    ))
