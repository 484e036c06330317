"""Poisson clocks in virtual time for asynchronous gossip (the model of DADAO: Nabli &
Oyallon, 2023, "DADAO: Decoupled Accelerated Decentralized Asynchronous Optimization"):
every undirected edge has an independent Poisson clock of rate `edge_rate` that triggers a
pairwise gossip exchange (randomized gossip: Boyd et al., 2006), and every peer one of rate
`step_rate` that triggers a local SGD step.

The superposition of those clocks over [t0, t1) is one Poisson process of rate
|E| edge_rate + n step_rate whose events pick their clock in proportion to its rate; that is
how they are drawn here (same law, vectorised). Events are ordered by (time, kind, id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scenarios.topology import Graph

STEP, GOSSIP, WAKE = 0, 1, 2  # event kinds, in tie-break order


@dataclass(frozen=True)
class Events:
    time: np.ndarray  # float64 [E], ascending
    kind: np.ndarray  # int8 [E]: STEP, GOSSIP or WAKE
    a: np.ndarray  # int64 [E]: the stepping (waking) peer, or the edge's lower endpoint
    b: np.ndarray  # int64 [E]: the edge's upper endpoint (-1 for a step or a wake-up)

    @property
    def size(self) -> int:
        return int(self.time.size)


def undirected_edges(graph: Graph) -> np.ndarray:
    """[m, 2] unique pairs (i < j)."""
    keep = graph.src < graph.dst
    return np.stack([graph.src[keep], graph.dst[keep]], axis=1)


def poisson_events(edges: np.ndarray, num_peers: int, edge_rate: float | np.ndarray,
                   step_rate: float | np.ndarray, t0: float, t1: float,
                   rng: np.random.Generator, peers: np.ndarray | None = None,
                   kind: int = GOSSIP) -> Events:
    """Every clock's ticks in [t0, t1), ordered by (time, kind, id): an exchange per edge at
    `edge_rate`, a local step per peer (of `peers`, default all) at `step_rate`. With
    kind=WAKE, `edges` is [m, 1] peers and each one's clock is a wake-up. A rate is one
    number for every clock, or one per clock ([m] edges, [len(peers)] peers: devices of
    different speeds); the event then picks its clock in proportion to its rate."""
    peers = np.arange(num_peers) if peers is None else np.asarray(peers, dtype=np.int64)
    if not peers.size:
        return Events(np.zeros(0), np.zeros(0, np.int8), np.zeros(0, np.int64),
                      np.zeros(0, np.int64))
    num_peers = peers.size
    m = edges.shape[0]
    each = np.ndim(edge_rate) or np.ndim(step_rate)
    edge_total = float(np.sum(edge_rate)) if np.ndim(edge_rate) else m * edge_rate
    step_total = float(np.sum(step_rate)) if np.ndim(step_rate) else num_peers * step_rate
    count = rng.poisson((edge_total + step_total) * (t1 - t0))
    time = rng.uniform(t0, t1, count)
    is_gossip = rng.random(count) < edge_total / (edge_total + step_total)
    kinds = np.where(is_gossip, kind, STEP).astype(np.int8)
    if each:
        edge_idx = _pick(np.broadcast_to(edge_rate, (m,)), count, rng)
        peer_idx = _pick(np.broadcast_to(step_rate, (num_peers,)), count, rng)
    else:  # equal rates: uniform picks (the draws of runs without devices, unchanged)
        edge_idx = rng.integers(0, max(m, 1), count)
        peer_idx = rng.integers(0, num_peers, count)
    ends = edges[edge_idx] if m else np.zeros((count, 2), dtype=np.int64)
    a = np.where(is_gossip, ends[:, 0], peers[peer_idx]).astype(np.int64)
    b = np.where(is_gossip & (kind == GOSSIP), ends[:, -1], -1).astype(np.int64)
    order = np.lexsort((np.where(is_gossip, edge_idx, peer_idx), kinds, time))
    return Events(time[order], kinds[order], a[order], b[order])


def _pick(rates: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` clock indices, each with probability rate / total (0 where there are none)."""
    if not rates.size:
        rng.random(count)  # the same stream consumed either way
        return np.zeros(count, dtype=np.int64)
    cumulative = np.cumsum(rates, dtype=np.float64)
    u = rng.random(count) * cumulative[-1]
    return np.minimum(np.searchsorted(cumulative, u, side="right"), rates.size - 1)


def device_rates(step_s: np.ndarray, message_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per peer, how much faster than the population's median peer it computes (median step
    time / its step time) and communicates (median message time / its own: latency + one
    message's download and upload). Clocks scale by these: a peer twice as fast steps twice
    as often; the median peer keeps the configured rates."""
    return (np.median(step_s) / step_s, np.median(message_s) / message_s)


def wake_levels(events: Events, reads: list[np.ndarray], num_peers: int) -> np.ndarray:
    """Levels of steps and wake-ups: a wake-up of peer i writes i and reads `reads[i]` (its
    in-neighbours), a step reads and writes its peer. An event's level is 1 + the highest
    level of an earlier event that touched any peer it touches, so the events of a level
    neither read nor write what another of them writes: running levels in order is running
    the events one by one."""
    last = np.full(num_peers, -1, dtype=np.int64)
    level = np.empty(events.size, dtype=np.int64)
    for e, (kind, a) in enumerate(zip(events.kind.tolist(), events.a.tolist(), strict=True)):
        touched = reads[a] if kind == WAKE else np.array([a])
        lv = int(last[touched].max()) + 1 if touched.size else int(last[a]) + 1
        lv = max(lv, int(last[a]) + 1)
        level[e] = lv
        last[touched] = lv
        last[a] = lv
    return level


def conflict_free_levels(events: Events, num_peers: int) -> np.ndarray:
    """level[e] = 1 + the highest level of an earlier event on the same peer(s), from 0.

    Events of one level touch disjoint peers, so they commute and run together (vectorised);
    running levels in order gives exactly the result of processing events one by one."""
    last = np.full(num_peers, -1, dtype=np.int64)
    level = np.empty(events.size, dtype=np.int64)
    for e, (a, b) in enumerate(zip(events.a.tolist(), events.b.tolist(), strict=True)):
        lv = last[a] + 1 if b < 0 else max(last[a], last[b]) + 1
        level[e] = last[a] = lv
        if b >= 0:
            last[b] = lv
    return level


@dataclass(frozen=True)
class DadaoClocks:
    """DADAO's communication clocks for a graph (Nabli & Oyallon, 2023; the paper's uniform
    rates, not its SDP): with L_u the Laplacian weighted by the uniform edge probabilities
    1 / |E|, chi_1 = 1 / its smallest positive eigenvalue and chi_2 = its largest effective
    resistance over the edges, (1/2)(e_i - e_j)^T L_u^+ (e_i - e_j). Every edge fires at
    `edge_rate` = sqrt(2 chi_1 chi_2) / |E| (a total of sqrt(2 chi_1 chi_2) exchanges per unit
    of time), so the rate-weighted Laplacian Lambda = sqrt(2 chi_1 chi_2) L_u has
    chi_1* chi_2* = 1/2, the paper's condition; `chi1_star` = chi_1 / sqrt(2 chi_1 chi_2)."""

    chi1: float
    chi2: float
    edge_rate: float
    chi1_star: float


def dadao_clocks(edges: np.ndarray, num_peers: int) -> DadaoClocks:
    """DADAO's clocks over the undirected `edges` ([m, 2]) of `num_peers` nodes. A peer with
    no edge (offline) is left out; on a disconnected graph chi_1 is the smallest positive
    eigenvalue's over all components (the slowest one's)."""
    m = edges.shape[0]
    if m == 0:
        return DadaoClocks(0.0, 0.0, 0.0, 0.0)
    nodes = np.unique(edges)
    at = np.searchsorted(nodes, edges)
    k = nodes.size
    lap = np.zeros((k, k))
    np.add.at(lap, (at[:, 0], at[:, 1]), -1.0)
    np.add.at(lap, (at[:, 1], at[:, 0]), -1.0)
    lap[np.arange(k), np.arange(k)] = -lap.sum(axis=1)
    lap /= m
    eig = np.linalg.eigvalsh(lap)
    chi1 = 1.0 / float(eig[eig > 1e-9 * eig[-1]][0])
    pinv = np.linalg.pinv(lap, hermitian=True)
    i, j = at[:, 0], at[:, 1]
    chi2 = float(np.max(0.5 * (pinv[i, i] + pinv[j, j] - 2 * pinv[i, j])))
    total = float(np.sqrt(2 * chi1 * chi2))
    return DadaoClocks(chi1, chi2, total / m, chi1 / total)
