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
from scipy import sparse

from engine.backends.runtime import Pools, pool_of
from engine.compute.evaluation import Evaluator
from engine.compute.peers import LevelTimes, PeerPool, PeerScores
from engine.core.events import MESSAGE_LOST
from engine.core.events import Events as FaultEvents
from engine.loops.decentralized import (
    GossipSetup,
    PeerEvaluation,
    _exports,
    _sorted,
    check_consensus,
    consensus_summary,
    level_plan,
    peer_accuracy,
    peer_rows,
    pool_imports,
)
from engine.loops.keeper import Keeper
from engine.loops.skeleton import LoopResult, Round, Schedule, Scores, Timing, run_rounds
from engine.loops.world import PeerWorld
from engine.records.logs import MISSING, RoundRows, RunLogger, event_rows
from engine.records.progress import RoundProgress
from scenarios.clocks import (
    GOSSIP,
    STEP,
    WAKE,
    DadaoClocks,
    Events,
    conflict_free_levels,
    dadao_clocks,
    device_rates,
    poisson_events,
    undirected_edges,
    wake_levels,
)
from scenarios.mixing import column_stochastic
from scenarios.network import drop_links


@dataclass(frozen=True)
class Rates:
    edge: float  # gossip exchanges per edge per unit of virtual time
    step: float  # local SGD steps per peer per unit of virtual time
    wake: float = 1.0  # wake-ups per peer per unit of virtual time (non-pairwise policies)


def _level_args(events: Events, sel: np.ndarray, bounds: np.ndarray,
                clocks: DadaoClocks | None = None):
    """Per pool: (steps, local pairs [k, 2], cross ends [c, 2], exports per pool, DADAO's
    event times or None)."""
    is_step = sel & (events.kind == STEP)
    steps, step_t = events.a[is_step], events.time[is_step]
    gossip = sel & (events.kind == GOSSIP)
    a, b, t = events.a[gossip], events.b[gossip], events.time[gossip]
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
        here = pool_of(bounds, steps) == p
        order = np.argsort(steps[here], kind="stable")
        times = None if clocks is None else LevelTimes(
            step_t[here][order], t[local], np.concatenate([t[out_a], t[out_b]]),
            clocks.chi1_star)
        out.append((steps[here][order], np.stack([a[local], b[local]], 1), cross, exports,
                    times))
    return out


def async_unit(pools: Pools, events: Events, shift: np.ndarray | None,
               clocks: DadaoClocks | None = None, until: float | None = None):
    """Run one unit's events on the pools (DADAO's dynamics with `clocks`, its peers' ODE
    run on to `until` at the end); returns the pools' consensus sums."""
    levels = conflict_free_levels(events, int(pools.bounds[-1]))
    n, carried, sent = pools.num_pools, None, None
    for level in range(int(levels.max()) + 1 if levels.size else 0):
        args = _level_args(events, levels == level, pools.bounds, clocks)
        calls = [(*a, *_received(carried, sent, p)) for p, a in enumerate(args)]
        carried = pools.map(PeerPool.async_level, calls, num_returns=1 + n)
        sent = [a[3] for a in args]
    return pools.get(pools.map(PeerPool.async_flush, [(shift, until,
                                                       *_received(carried, sent, p))
                                                      for p in range(n)]))


def _received(carried, sent, p: int) -> list:
    """The exports addressed to pool p by the previous level's calls."""
    if carried is None:
        return []
    return [carried[q][1 + p] for q in range(len(carried)) if sent[q][p].size]


def touched(w: sparse.csr_matrix, push: bool) -> list[np.ndarray]:
    """Per peer, the peers its wake-up touches: the in-neighbours it pulls (W's row), or with
    push-sum the out-neighbours it pushes to (W's column); itself included."""
    m = _sorted(sparse.csr_matrix(w.T) if push else w)
    return np.split(m.indices.astype(np.int64), m.indptr[1:-1])


def wake_unit(pools: Pools, events: Events, w: sparse.csr_matrix,
              shift: np.ndarray | None, push: bool = False) -> list:
    """Run a unit of wake-ups and steps: level by level (scenarios/clocks.py wake_levels),
    each level's woken peers pull their rows of W from the current models, or (push-sum,
    column-stochastic W) push their columns: a woken j keeps W_jj of its numerator and mass
    and adds W_ij of them to each out-neighbour i, so the total mass stays n. The pools'
    consensus sums at the end."""
    n, num_pools = int(pools.bounds[-1]), pools.num_pools
    w = _sorted(w)
    levels = wake_levels(events, touched(w, push), n)
    count = int(levels.max()) + 1 if levels.size else 0
    mats, steps = [], []
    for level in range(count):
        here = levels == level
        woken = np.zeros(n)
        woken[events.a[here & (events.kind == WAKE)]] = 1.0
        moved = w @ sparse.diags(woken) if push else sparse.diags(woken) @ w
        mats.append(_sorted(sparse.diags(1.0 - woken) + moved))
        steps.append(events.a[here & (events.kind == STEP)])
    imports = [pool_imports(m, pools.bounds) for m in mats]
    carried = pools.map(PeerPool.export, [(_exports(imports[0], q), False)
                                          for q in range(num_pools)],
                        num_returns=1 + num_pools) if count else None
    for level, m in enumerate(mats):
        nxt = imports[level + 1] if level + 1 < count else None
        calls = []
        for p in range(num_pools):
            own = steps[level][pool_of(pools.bounds, steps[level]) == p]
            received = [carried[q][1 + p] for q in range(num_pools) if imports[level][p][q].size]
            calls.append((np.sort(own), level_plan(m, pools.bounds, p, imports[level], nxt),
                          *received))
        carried = pools.map(PeerPool.wake_level, calls, num_returns=1 + num_pools)
    return pools.get(pools.map(PeerPool.async_flush, [(shift,)] * num_pools))


class AsyncGossipUnits:
    """Asynchronous gossip: a "round" is one unit of virtual time [r, r + 1) of Poisson
    events, then consensus sums and the final merge. Plain gossip runs randomized pairwise
    averaging (an exchange per edge clock); any other consensus policy, an attack that
    forges messages, or compressed gossip runs wake-ups: each online peer's clock wakes it at
    `wake_rate`, and it applies the policy to its live in-neighbours' models (a pull), or
    with push-sum pushes shares of its own (a push), or with CHOCO-SGD publishes its
    compressed difference and steps on its neighbours' public copies. Every unit steps the
    world: who is up (crashes, churn) and online (availability); links down and lost
    messages as in a synchronous round. Devices set the clocks' speeds: a peer's step clock
    runs at step_rate x (median step time / its step time), its wake-up clock and its edges'
    exchange clocks at the rate x (median message time / its own, the slower end's for an
    edge), a message's time being latency + one message down and up."""

    def __init__(self, setup: GossipSetup, rates: Rates, pools: Pools, world: PeerWorld,
                 evaluator: Evaluator, logger: RunLogger, pairwise: bool,
                 compressed: bool = False, accelerated: bool = False) -> None:
        self.setup, self.rates, self.pools, self.world = setup, rates, pools, world
        self.accelerated = accelerated  # DADAO: edge rates from the graph, its dynamics
        self.network, self.pairwise = world.network, pairwise
        self.logger, self.scores = logger, PeerEvaluation(setup, pools, evaluator)
        self.shift: np.ndarray | None = None
        self.mean, self.consensus_distance, self.events = None, math.nan, None
        self.reads: list[np.ndarray] = []  # wake-ups: whom each peer's wake-up touches
        # a woken peer sends to its out-neighbours (push-sum's shares, or CHOCO's q_i)
        self.broadcast = column_stochastic(world.network.mixing_fn) or compressed
        d = world.devices
        message_s = d.latency_s + world.model_bytes / d.down_bps + world.model_bytes / d.up_bps
        # devices of different speeds: each clock scaled by its peer's (an edge's slower end's)
        self.compute, self.comm = device_rates(d.step_s, message_s)

    def _rates(self, rate: float, factor: np.ndarray) -> float | np.ndarray:
        """A clock rate per peer (or edge): `rate` scaled by its device factor; one number
        when every device is alike (the same draws as a run without devices)."""
        return rate if np.all(factor == 1) else rate * factor

    def step(self, r: int, last: bool) -> Round:
        t0, n, seeds = time.perf_counter(), int(self.pools.bounds[-1]), self.setup.seeds
        up, faults = self.world.liveness.step(r)
        online = up & self.world.availability.mask(r)
        peers = None if online.all() else np.flatnonzero(online)
        rng, rates = seeds.rng("clock", r), self.rates
        if self.pairwise:
            graph = self.network.graph(r)
            if peers is not None:
                graph = graph.restricted(online)
            down = FaultEvents.of(MESSAGE_LOST, np.zeros(0, np.int64))
            if self.world.failures.link_failure:
                graph, down = drop_links(graph, self.world.failures.link_failure,
                                         seeds.rng("link_failure", r))
            edges = undirected_edges(graph)
            stepping = np.arange(n) if peers is None else peers
            clocks = dadao_clocks(edges, n) if self.accelerated else None
            events = poisson_events(
                edges, n, self._rates(rates.edge if clocks is None else clocks.edge_rate,
                                      np.minimum(self.comm[edges[:, 0]],
                                                 self.comm[edges[:, 1]])),
                self._rates(rates.step, self.compute[stepping]), float(r), float(r + 1), rng,
                peers)
            events, lost = _lost_exchanges(events, self.world.failures.message_loss,
                                           seeds.rng("message_loss", r))
            stats = async_unit(self.pools, events, self.shift, clocks,
                               None if clocks is None else float(r + 1))
            faults = FaultEvents.concat([faults, down, lost])
        else:
            ids = np.flatnonzero(online)
            w, lost = (self.network.mixing(r), FaultEvents.concat([])) if peers is None and \
                not self.world.faults else self.network.faulty_mixing(r, online,
                                                                      self.world.failures)
            events = poisson_events(ids[:, None], n, self._rates(rates.wake, self.comm[ids]),
                                    self._rates(rates.step, self.compute[ids]), float(r),
                                    float(r + 1), rng, ids, kind=WAKE)
            push = column_stochastic(self.network.mixing_fn)
            stats = wake_unit(self.pools, events, w, self.shift, push)
            self.reads = touched(w, push or self.broadcast)
            faults = FaultEvents.concat([faults, lost])
        self.logger.append(event_rows(r, float(r), faults))
        self.events = events
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
        _log_unit(self.logger, self.setup, r, self.events, self.reads, self.scores.taken(),
                  scores, done, self.consensus_distance, timing, self.pools.bounds,
                  self.broadcast)

    def check(self, r: int) -> None:
        check_consensus(self.mean, self.consensus_distance, r)
        self.shift = self.mean.astype(np.float32)  # the next reference point (as pools use)

    def model(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.mean, dtype=np.float32))


def _lost_exchanges(events: Events, p: float, rng: np.random.Generator
                    ) -> tuple[Events, FaultEvents]:
    """Each pairwise exchange lost with probability p (both peers keep their models)."""
    if p == 0:
        return events, FaultEvents.of(MESSAGE_LOST, np.zeros(0, np.int64))
    gossip = np.flatnonzero(events.kind == GOSSIP)
    lost = gossip[rng.random(gossip.size) < p]
    keep = np.ones(events.size, dtype=bool)
    keep[lost] = False
    kept = Events(events.time[keep], events.kind[keep], events.a[keep], events.b[keep])
    return kept, FaultEvents.of(MESSAGE_LOST, events.a[lost], events.b[lost].astype(float))


def async_gossip_units(setup: GossipSetup, rates: Rates, pools: Pools, world: PeerWorld,
                       evaluator: Evaluator, logger: RunLogger, progress: RoundProgress,
                       pairwise: bool = True, compressed: bool = False,
                       keeper: Keeper | None = None, accelerated: bool = False) -> LoopResult:
    loop = AsyncGossipUnits(setup, rates, pools, world, evaluator, logger, pairwise,
                            compressed, accelerated)
    return run_rounds(loop, Schedule(setup.rounds, setup.eval_every, setup.dead_rounds), progress,
                      keeper)


def _log_unit(logger: RunLogger, setup: GossipSetup, r: int, events: Events,
              reads: list[np.ndarray],
              peers: PeerScores | None, scores: Scores, done: Round, distance: float,
              timing: Timing, bounds: np.ndarray, broadcast: bool = False) -> None:
    steps = done.updates
    n = int(bounds[-1])
    gossip = events.kind == GOSSIP
    sent = np.bincount(np.concatenate([events.a[gossip], events.b[gossip]]), minlength=n)
    woken = events.a[events.kind == WAKE]
    if woken.size:  # a pull: each live in-neighbour sends the woken peer its model; else
        # the woken peer sends to each of its out-neighbours (reads: whom each wake touches)
        if broadcast:
            sent = sent + np.array([reads[i].size - 1 for i in range(n)]) \
                * np.bincount(woken, minlength=n)
        else:
            sent = sent + np.bincount(np.concatenate([reads[i] for i in woken]),
                                      minlength=n) - np.bincount(woken, minlength=n)
    messages = int(sent.sum())
    if peers is not None:
        logger.append(peer_rows(r, peers, bounds, [], sent * setup.model_bytes))
    logger.append(RoundRows(
        round=[r], num_selected=[steps], num_updates=[steps],
        num_byzantine=[setup.byzantine.size], train_loss=[MISSING],
        test_loss=[scores.loss], test_accuracy=[scores.accuracy],
        test_return=[scores.test_return],
        mean_update_norm=[MISSING], round_wall_s=[timing.round_s],
        train_wall_s=[done.train_s], aggregate_wall_s=[MISSING], eval_wall_s=[timing.eval_s],
        wall_time_s=[timing.wall_s], client_updates_per_s=[steps / max(timing.round_s, 1e-9)],
        consensus_distance=[distance],
        **peer_accuracy(None if peers is None else peers.test_accuracy),
        gossip_messages=[messages], virtual_time=[float(r + 1)],
        bytes_communicated=[messages * setup.model_bytes],
    ))
