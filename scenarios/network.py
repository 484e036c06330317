"""The peers' network over rounds: the configured graph (static, or redrawn every round),
scheduled outages, and the mixing matrix W the gossip step uses in each round. All seeded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import sparse

from engine.core.config import FailuresConfig
from engine.core.errors import ConfigError
from engine.core.events import LINK_DOWN, MESSAGE_LOST, Events
from engine.core.seeds import SeedTree
from scenarios import topology
from scenarios.mixing import Mixing, column_stochastic, degree_stats, mixing_matrix, spectral_gap
from scenarios.topology import Graph, Outage


@dataclass(frozen=True)
class NetworkSummary:
    """What the runs table records about round 0's graph and mixing matrix."""

    kind: str
    num_edges: int
    degree_min: int
    degree_mean: float
    degree_max: int
    spectral_gap: float


class Network:
    """`topology(n, rng)` draws the graph (a TOPOLOGIES entry with its parameters bound): once
    from the `topology` stream, or (`redraw`) every round from `(topology, round)`. `mixing`
    (a MIXING entry) turns each round's graph into W. `label` names the topology in the runs
    table."""

    def __init__(self, topology: Callable[..., Graph], mixing: Mixing, num_peers: int,
                 seeds: SeedTree, label: str = "", redraw: bool = False,
                 allow_disconnected: bool = False, outages: Sequence = ()) -> None:
        self.topology, self.mixing_fn, self.n, self.seeds = topology, mixing, num_peers, seeds
        self.label, self.redraw, self.allow_disconnected = label, redraw, allow_disconnected
        self.outages = [Outage(o.start, o.stop, o.fraction, o.parts) for o in outages]
        first = self.graph(0)  # fails fast on bad parameters or a disconnected graph
        if first.directed and not column_stochastic(mixing):
            raise ConfigError(
                f"topology.kind={label} is directed: set gossip.mixing=push_sum "
                "(with consensus=push_sum)")

    def _draw(self, rng: np.random.Generator) -> Graph:
        graph = self.topology(self.n, rng)
        if not self.allow_disconnected:
            topology.check_connected(graph, f"topology.kind={self.label}")
        return graph

    @cached_property
    def _static(self) -> Graph:
        return self._draw(self.seeds.rng("topology"))

    def graph(self, round_idx: int) -> Graph:
        """The graph of `round_idx`: static or freshly drawn, minus the scheduled outages."""
        graph = self._draw(self.seeds.rng("topology", round_idx)) if self.redraw \
            else self._static
        for i, outage in enumerate(self.outages):
            graph = topology.apply_outages(graph, round_idx, [outage],
                                           self.seeds.rng("outage", i, round_idx))
        return graph

    def mixing(self, round_idx: int) -> sparse.csr_matrix:
        return mixing_matrix(self.graph(round_idx), self.mixing_fn)

    def faulty_mixing(self, round_idx: int, alive: np.ndarray, failures: FailuresConfig
                      ) -> tuple[sparse.csr_matrix, Events]:
        """Round r's mixing among the living peers, with each undirected link down with
        probability `link_failure` (before the weights are computed), then each message (an
        off-diagonal entry: receiver i, sender j) lost with probability `message_loss`: its
        weight stays with the peer that keeps the mass (i for row-stochastic mixing, the
        sender j for push-sum), so W keeps its stochasticity. Events: link_down (the lower
        end, value = the other end) and message_lost (the receiver, value = the sender)."""
        graph = self.graph(round_idx).restricted(alive)
        graph, down = drop_links(graph, failures.link_failure,
                                  self.seeds.rng("link_failure", round_idx))
        w = sparse.coo_matrix(mixing_matrix(graph, self.mixing_fn))
        rng = self.seeds.rng("message_loss", round_idx)
        lost = (w.row != w.col) & (rng.random(w.nnz) < failures.message_loss)
        keeper = w.col[lost] if column_stochastic(self.mixing_fn) else w.row[lost]
        data = np.where(lost, 0.0, w.data)
        rows, cols = np.concatenate([w.row, keeper]), np.concatenate([w.col, keeper])
        mixed = sparse.csr_matrix((np.concatenate([data, w.data[lost]]), (rows, cols)),
                                  shape=w.shape)  # duplicates are summed
        mixed.eliminate_zeros()
        messages = Events.of(MESSAGE_LOST, w.row[lost], w.col[lost].astype(np.float64))
        return mixed, Events.concat([down, messages])

    def summary(self) -> NetworkSummary:
        graph = self.graph(0)
        low, mean, high = degree_stats(graph)
        return NetworkSummary(self.label, graph.num_edges, int(low), float(mean), int(high),
                              float(spectral_gap(mixing_matrix(graph, self.mixing_fn))))


def drop_links(graph: Graph, p: float, rng: np.random.Generator) -> tuple[Graph, Events]:
    """Each undirected link (each arc of a directed graph) down with probability p."""
    first = graph.src < graph.dst if not graph.directed else np.ones(graph.src.size, bool)
    src, dst = graph.src[first], graph.dst[first]
    down = rng.random(src.size) < p
    kept = Graph.from_arcs(graph.num_nodes, src[~down], dst[~down], graph.directed)
    return kept, Events.of(LINK_DOWN, src[down], dst[down].astype(np.float64))
