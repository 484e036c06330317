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

from engine.backends.runtime import Pools, pool_of
from engine.compute.evaluation import Evaluator
from engine.loops.decentralized import (
    GossipResult,
    GossipSetup,
    _due,
    _evaluate,
    check_consensus,
    consensus_summary,
    peer_accuracy,
    peer_rows,
)
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
        carried = pools.call("async_level", calls, num_returns=1 + n)
        sent = [a[3] for a in args]
    return pools.get(pools.call("async_flush", [(shift, *_received(carried, sent, p))
                                                for p in range(n)]))


def _received(carried, sent, p: int) -> list:
    """The exports addressed to pool p by the previous level's calls."""
    if carried is None:
        return []
    return [carried[q][1 + p] for q in range(len(carried)) if sent[q][p].size]


def async_gossip_units(setup: GossipSetup, rates: Rates, pools: Pools, network: Network,
                       evaluator: Evaluator, logger: RunLogger,
                       progress: RoundProgress) -> GossipResult:
    n = int(pools.bounds[-1])
    shift, accuracies, start, distance, steps_total = None, [], time.perf_counter(), math.nan, 0
    for r in range(setup.rounds):
        t0 = time.perf_counter()
        edges = undirected_edges(network.graph(r))
        events = poisson_events(edges, n, rates.edge, rates.step, float(r), float(r + 1),
                                setup.seeds.rng("clock", r))
        mean, distance = consensus_summary(async_unit(pools, events, shift), shift)
        if setup.final_merge and r == setup.rounds - 1:
            pools.get(pools.call("set_models", [(mean,)] * pools.num_pools))
            distance = 0.0
        t_eval = time.perf_counter()
        scored = _evaluate(setup, pools, evaluator, mean, r) if _due(r, setup) else None
        t1 = time.perf_counter()
        num_steps = int((events.kind == STEP).sum())
        steps_total += num_steps
        acc = _log_unit(logger, setup, r, events, scored, distance, (t0, t_eval, t1, start),
                        pools.bounds)
        accuracies.append(acc)
        progress.update(acc, MISSING, num_steps / max(t1 - t0, 1e-9))
        check_consensus(mean, distance, r)
        shift = mean.astype(np.float32)  # the next reference point (float32, as pools use)
    evaluated = [a for a in accuracies if a is not MISSING]
    return GossipResult(mean, setup.rounds, evaluated[-1], max(evaluated),
                        time.perf_counter() - start, steps_total, distance)


def _log_unit(logger: RunLogger, setup: GossipSetup, r: int, events: Events, scored,
              distance: float, times, bounds: np.ndarray) -> float:
    t0, t_eval, t1, start = times  # start, events processed and summed, evaluated
    nan = MISSING
    acc = None if scored is None else scored.peers.test_accuracy
    if scored is not None:
        logger.append(peer_rows(r, scored.peers, bounds, []))
    steps = int((events.kind == STEP).sum())
    messages = 2 * int((events.kind == GOSSIP).sum())  # a pairwise average: one each way
    logger.append(RoundRows(
        round=[r], num_selected=[steps], num_updates=[steps],
        num_byzantine=[setup.byzantine.size], train_loss=[nan],
        test_loss=[nan if scored is None else scored.mean_loss],
        test_accuracy=[nan if scored is None else scored.mean_accuracy],
        mean_update_norm=[nan], round_wall_s=[t1 - t0], train_wall_s=[t_eval - t0],
        aggregate_wall_s=[nan], eval_wall_s=[t1 - t_eval], wall_time_s=[t1 - start],
        client_updates_per_s=[steps / max(t1 - t0, 1e-9)], consensus_distance=[distance],
        **peer_accuracy(acc), gossip_messages=[messages], virtual_time=[float(r + 1)],
        bytes_communicated=[messages * setup.model_bytes],
    ))
    return nan if scored is None else scored.mean_accuracy
