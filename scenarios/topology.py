"""Communication graphs of the peers: static generators, per-round graphs and scheduled outages.

A `Graph` is a normalised arc list, receiver-major: arcs are sorted by (dst, src), so the arcs
into node i are contiguous and row i of a mixing matrix lists i's in-neighbours. Undirected
graphs store both directions of each edge. Every generator is `(n, rng, **params) -> Graph` and
draws only from the generator it is given (deterministic ones ignore it). Time-varying graphs
are the same generators called with a per-round generator: a fresh random d-regular graph every
round is `random_regular(n, seeds.rng("topology", round), degree=d)`, and a random pairwise
gossip round is `random_matching(n, seeds.rng("topology", round))`.

Validation errors are `ConfigError`s naming `topology.<param>`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from engine.core.errors import ConfigError
from engine.core.plugins import Registry


@dataclass(frozen=True, eq=False)
class Graph:
    """Arcs src -> dst (int64 [A]) over nodes 0..num_nodes-1; build it with `from_arcs`."""

    num_nodes: int
    src: np.ndarray
    dst: np.ndarray
    directed: bool

    @classmethod
    def from_arcs(cls, n: int, src: Any, dst: Any, directed: bool) -> Graph:
        """Normalise: drop self-loops and duplicate arcs, symmetrise an undirected graph, sort
        the arcs by (dst, src). Ids outside [0, n) are a ValueError (callers validate input)."""
        src = np.asarray(src, dtype=np.int64).ravel()
        dst = np.asarray(dst, dtype=np.int64).ravel()
        if src.shape != dst.shape:
            raise ValueError(f"src and dst differ in length ({src.size} vs {dst.size})")
        if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
            raise ValueError(f"arc ids must lie in [0, {n})")
        if not directed:
            src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        keep = src != dst
        keys, _ = _unique(dst[keep] * n + src[keep])  # sorted: receiver-major
        return cls._frozen(n, keys % n, keys // n, directed)

    @classmethod
    def _frozen(cls, n: int, src: np.ndarray, dst: np.ndarray, directed: bool) -> Graph:
        """Wrap arrays that are already normalised, read-only."""
        src, dst = src.astype(np.int64), dst.astype(np.int64)
        src.setflags(write=False)
        dst.setflags(write=False)
        return cls(int(n), src, dst, bool(directed))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Graph):
            return NotImplemented
        return (self.num_nodes == other.num_nodes and self.directed == other.directed
                and np.array_equal(self.src, other.src) and np.array_equal(self.dst, other.dst))

    __hash__ = None  # type: ignore[assignment]  (holds arrays)

    @property
    def num_arcs(self) -> int:
        return int(self.src.size)

    @property
    def num_edges(self) -> int:
        """Unordered pairs for an undirected graph, arcs for a directed one."""
        return self.num_arcs if self.directed else self.num_arcs // 2

    def in_degree(self) -> np.ndarray:
        return np.bincount(self.dst, minlength=self.num_nodes).astype(np.int64)

    def out_degree(self) -> np.ndarray:
        return np.bincount(self.src, minlength=self.num_nodes).astype(np.int64)

    def adjacency(self) -> sp.csr_matrix:
        """A [n, n] float64 with A[i, j] = 1 when j -> i (row i: the in-neighbours of i)."""
        n = self.num_nodes
        return sp.csr_matrix((np.ones(self.num_arcs), (self.dst, self.src)), shape=(n, n))

    def num_components(self) -> int:
        """Connected components (strongly connected ones for a directed graph)."""
        count, _ = csgraph.connected_components(
            self.adjacency(), directed=self.directed, connection="strong")
        return int(count)

    def is_connected(self) -> bool:
        return self.num_components() == 1

    def without_arcs(self, mask: np.ndarray) -> Graph:
        """Drop the arcs where mask [A] is True; in an undirected graph, dropping either
        direction of an edge drops the edge."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.src.shape:
            raise ValueError(f"mask has shape {mask.shape}, expected ({self.num_arcs},)")
        if not self.directed:
            pairs = _pair_keys(self)
            mask = np.isin(pairs, pairs[mask])
        return Graph._frozen(self.num_nodes, self.src[~mask], self.dst[~mask], self.directed)

    def restricted(self, alive: np.ndarray) -> Graph:
        """The graph among living peers: every arc touching a dead node is dropped; the node
        ids (and num_nodes) stay as they are."""
        alive = np.asarray(alive, dtype=bool)
        if alive.shape != (self.num_nodes,):
            raise ValueError(f"alive has shape {alive.shape}, expected ({self.num_nodes},)")
        return self.without_arcs(~(alive[self.src] & alive[self.dst]))


def _unique(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct keys, index of each key among them): np.unique by one stable sort
    (numpy 2.4's np.unique took 0.9 s on 1M int64 keys, a sort 0.02 s)."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.ones(ordered.size, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    inverse = np.empty(keys.size, dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def _pair_keys(graph: Graph) -> np.ndarray:
    """min(src, dst) * n + max(src, dst) per arc: both directions of an edge share a key."""
    lo, hi = np.minimum(graph.src, graph.dst), np.maximum(graph.src, graph.dst)
    return lo * graph.num_nodes + hi


def _undirected(n: int, src: np.ndarray, dst: np.ndarray) -> Graph:
    return Graph.from_arcs(n, src, dst, directed=False)


def _need(ok: bool, key: str, what: str, got: Any) -> None:
    """Raise the one-line ConfigError `topology.<key>: <what> (got <got>)` unless ok; the
    node count is the config's `population.num_clients`."""
    if not ok:
        where = "population.num_clients" if key == "num_nodes" else f"topology.{key}"
        raise ConfigError(f"{where}: {what} (got {got!r})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_nodes(n: int, minimum: int, kind: str) -> None:
    _need(_is_int(n) and n >= minimum, "num_nodes", f"{kind} needs an integer >= {minimum}", n)


# --- Deterministic graphs ------------------------------------------------------------------


def ring(n: int, rng: np.random.Generator | None = None) -> Graph:
    """Cycle C_n: i -- i+1 (mod n); every node has degree 2."""
    _check_nodes(n, 3, "ring")
    i = np.arange(n)
    return _undirected(n, i, (i + 1) % n)


def _shape(n: int, kind: str) -> tuple[int, int]:
    """rows x cols with rows the largest divisor of n that is <= sqrt(n)."""
    _check_nodes(n, 4, kind)
    rows = max(d for d in range(1, int(np.sqrt(n)) + 1) if n % d == 0)
    _need(rows > 1, "num_nodes", f"{kind} needs a composite number of nodes (rows x cols, "
          "rows >= 2); pick e.g. a square or n = 2^k", n)
    return rows, n // rows


def torus(n: int, rng: np.random.Generator | None = None) -> Graph:
    """2-D torus C_rows x C_cols (node r * cols + c, wrap-around): degree 4 when rows >= 3;
    with rows == 2 the two vertical wraps are the same edge, so the degree is 3."""
    rows, cols = _shape(n, "torus")
    r, c = np.divmod(np.arange(n), cols)
    right = r * cols + (c + 1) % cols
    down = ((r + 1) % rows) * cols + c
    i = np.arange(n)
    return _undirected(n, np.concatenate([i, i]), np.concatenate([right, down]))


def grid(n: int, rng: np.random.Generator | None = None) -> Graph:
    """2-D grid P_rows x P_cols, the torus's shape without wrap-around."""
    rows, cols = _shape(n, "grid")
    r, c = np.divmod(np.arange(n), cols)
    i = np.arange(n)
    right, down = c + 1 < cols, r + 1 < rows
    src = np.concatenate([i[right], i[down]])
    return _undirected(n, src, np.concatenate([i[right] + 1, i[down] + cols]))


def complete(n: int, rng: np.random.Generator | None = None) -> Graph:
    """K_n: every pair of nodes."""
    _check_nodes(n, 2, "complete")
    src, dst = np.triu_indices(n, k=1)
    return _undirected(n, src, dst)


def star(n: int, rng: np.random.Generator | None = None) -> Graph:
    """Node 0 is the hub, linked to every other node (the leaves)."""
    _check_nodes(n, 2, "star")
    return _undirected(n, np.zeros(n - 1, dtype=np.int64), np.arange(1, n))


def exponential(n: int, rng: np.random.Generator | None = None) -> Graph:
    """Directed exponential graph of Stochastic Gradient Push (Assran et al., 2019, ICML):
    i -> (i + 2^k) mod n for k = 0..floor(log2(n - 1)); every out-degree is floor(log2(n-1))+1."""
    _check_nodes(n, 2, "exponential")
    hops = 1 << np.arange(int(n - 1).bit_length(), dtype=np.int64)  # 2^k <= n - 1
    i = np.arange(n, dtype=np.int64)
    return Graph.from_arcs(n, np.repeat(i, hops.size), (i[:, None] + hops).ravel() % n, True)


def hypercube(n: int, rng: np.random.Generator | None = None) -> Graph:
    """Hypercube Q_d on n = 2^d nodes: i -- i XOR 2^b; every node has degree d."""
    _need(_is_int(n) and n >= 2 and (n & (n - 1)) == 0, "num_nodes",
          "hypercube needs a power of two >= 2", n)
    bits = 1 << np.arange(int(n).bit_length() - 1, dtype=np.int64)
    i = np.arange(n, dtype=np.int64)
    return _undirected(n, np.repeat(i, bits.size), (i[:, None] ^ bits).ravel())


# --- Random graphs -------------------------------------------------------------------------


def random_regular(n: int, rng: np.random.Generator, degree: int = 4) -> Graph:
    """Random `degree`-regular graph by networkx.random_regular_graph (Steger & Wormald, 1999,
    "Generating random regular graphs quickly": asymptotically uniform for small degrees),
    seeded from rng. Called with a per-round rng it is a time-varying topology."""
    _check_nodes(n, 2, "random_regular")
    _need(_is_int(degree) and 1 <= degree < n, "degree", f"an integer in [1, {n - 1}]", degree)
    _need(n * degree % 2 == 0, "degree", f"num_nodes * degree must be even (num_nodes = {n})",
          degree)
    g = nx.random_regular_graph(int(degree), int(n), seed=int(rng.integers(2**63)))
    edges = np.array(g.edges(), dtype=np.int64).reshape(-1, 2)
    return _undirected(n, edges[:, 0], edges[:, 1])


def erdos_renyi(n: int, rng: np.random.Generator, p: float = 0.1) -> Graph:
    """G(n, p) by geometric skips over the n(n-1)/2 upper-triangle pairs in row-major order
    (Batagelj & Brandes, 2005, "Efficient generation of large random networks"): the gap to
    the next present pair is Geometric(p), so the cost is O(n + edges), drawn in numpy chunks."""
    _check_nodes(n, 1, "erdos_renyi")
    _need(isinstance(p, float | int) and 0 <= p <= 1, "p", "a probability in [0, 1]", p)
    pairs = n * (n - 1) // 2
    if p == 0 or pairs == 0:
        return _undirected(n, np.empty(0, np.int64), np.empty(0, np.int64))
    chunk = int(p * pairs + 6 * np.sqrt(p * pairs) + 64)
    parts, last = [], -1
    while last < pairs - 1:
        index = last + np.cumsum(rng.geometric(p, size=chunk))
        parts.append(index)
        last = int(index[-1])
    index = np.concatenate(parts)
    index = index[index < pairs]
    # Row i starts at linear index i(n-1) - i(i-1)/2 and holds the pairs (i, i+1..n-1).
    rows = np.arange(n, dtype=np.int64)
    starts = rows * (n - 1) - rows * (rows - 1) // 2
    i = np.searchsorted(starts, index, side="right") - 1
    return _undirected(n, i, index - starts[i] + i + 1)


def small_world(n: int, rng: np.random.Generator, k: int = 4, beta: float = 0.1) -> Graph:
    """Watts & Strogatz (1998, Nature): the ring lattice where i -- i+1..i+k/2, then each
    lattice edge (i, i+j), visited for j = 1..k/2 and i = 0..n-1 in turn, is rewired with
    probability beta to (i, w), w uniform among the nodes that are neither i nor already
    linked to i (skipped when i is linked to everyone), as in networkx.watts_strogatz_graph."""
    _check_nodes(n, 3, "small_world")
    _need(_is_int(k) and k >= 2 and k % 2 == 0 and k < n, "k",
          f"an even integer in [2, {n - 1}]", k)
    _need(isinstance(beta, float | int) and 0 <= beta <= 1, "beta", "a probability in [0, 1]",
          beta)
    j, i = np.divmod(np.arange(n * (k // 2)), n)
    src, dst = i.copy(), (i + j + 1) % n
    rewire = np.flatnonzero(rng.random(src.size) < beta)
    if rewire.size:
        _rewire(n, src, dst, rewire, rng)
    return _undirected(n, src, dst)


def _rewire(n: int, src: np.ndarray, dst: np.ndarray, which: np.ndarray,
            rng: np.random.Generator) -> None:
    """Watts-Strogatz rewiring in place, edge by edge (each choice depends on the ones before)."""
    linked: list[set[int]] = [set() for _ in range(n)]
    for u, v in zip(src.tolist(), dst.tolist(), strict=True):
        linked[u].add(v)
        linked[v].add(u)
    for e in which.tolist():
        u, v = int(src[e]), int(dst[e])
        if len(linked[u]) >= n - 1:
            continue
        w = int(rng.integers(n))
        while w == u or w in linked[u]:
            w = int(rng.integers(n))
        linked[u].discard(v)
        linked[v].discard(u)
        linked[u].add(w)
        linked[w].add(u)
        dst[e] = w


def barabasi_albert(n: int, rng: np.random.Generator, m: int = 2) -> Graph:
    """Preferential attachment (Barabasi & Albert, 1999, Science): nodes 0..m-1 start alone,
    node m links to all of them, and each later node links to m distinct earlier nodes drawn
    with probability proportional to their degree (uniform over the list of arc endpoints, as
    in networkx.barabasi_albert_graph's `repeated_nodes`). Exactly m (n - m) edges."""
    _check_nodes(n, 2, "barabasi_albert")
    _need(_is_int(m) and 1 <= m < n, "m", f"an integer in [1, {n - 1}]", m)
    num_edges = m * (n - m)
    src = np.repeat(np.arange(m, n, dtype=np.int64), m)
    dst = np.empty(num_edges, dtype=np.int64)
    ends = np.empty(2 * num_edges, dtype=np.int64)  # every edge endpoint so far
    dst[:m] = np.arange(m)
    ends[:m], ends[m:2 * m] = np.arange(m), m
    for t in range(m + 1, n):
        filled = 2 * m * (t - m)
        targets: set[int] = set()
        while len(targets) < m:
            targets.update(ends[rng.integers(filled, size=m - len(targets))].tolist())
        chosen = np.fromiter(sorted(targets), dtype=np.int64, count=m)
        dst[m * (t - m):m * (t - m + 1)] = chosen
        ends[filled:filled + m], ends[filled + m:filled + 2 * m] = chosen, t
    return _undirected(n, src, dst)


def random_matching(n: int, rng: np.random.Generator) -> Graph:
    """A uniformly random perfect matching (one node left out when n is odd): consecutive
    pairs of a uniform permutation. Meant per round (randomised pairwise gossip, Boyd et al.,
    2006, "Randomized gossip algorithms"), with a per-round rng."""
    _check_nodes(n, 2, "random_matching")
    perm = rng.permutation(n)
    half = n // 2
    return _undirected(n, perm[0:2 * half:2], perm[1:2 * half:2])


# --- Edge list file ------------------------------------------------------------------------


def edge_list(n: int, rng: np.random.Generator | None = None, path: str | None = None,
              directed: bool = False) -> Graph:
    """Arcs read from a text/CSV file: one `src dst` or `src,dst` integer pair per line, `#`
    starts a comment. Undirected unless `directed`; self-loops and repeats are dropped."""
    _check_nodes(n, 1, "edge_list")
    _need(isinstance(path, str | Path) and str(path) != "", "path",
          "edge_list needs the path of a file of 'src dst' lines", path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"topology.path: cannot read {path} ({err})") from None
    pairs = [_parse_line(raw, n, path, lineno) for lineno, raw in enumerate(text.splitlines(), 1)]
    arcs = np.array([p for p in pairs if p is not None], dtype=np.int64).reshape(-1, 2)
    return Graph.from_arcs(n, arcs[:, 0], arcs[:, 1], bool(directed))


def _parse_line(raw: str, n: int, path: str | Path, lineno: int) -> tuple[int, int] | None:
    fields = raw.split("#", 1)[0].replace(",", " ").split()
    if not fields:
        return None
    try:
        if len(fields) != 2:
            raise ValueError
        u, v = int(fields[0]), int(fields[1])
    except ValueError:
        raise ConfigError(f"topology.path: {path} line {lineno}: expected two integer node "
                          f"ids 'src dst', got {raw.strip()!r}") from None
    for node in (u, v):
        if not 0 <= node < n:
            raise ConfigError(f"topology.path: {path} line {lineno}: node id {node} is "
                              f"outside [0, {n})")
    return u, v


# --- Registry ------------------------------------------------------------------------------

# A topology is a function (num_nodes, rng, **parameters) -> Graph; `build` binds the
# parameters, so the network can draw the graph again each round (`dynamic: redraw`).
TOPOLOGIES: Registry[Callable[..., Graph]] = Registry("topology", {
    "ring": ring, "torus": torus, "grid": grid, "complete": complete, "star": star,
    "random_regular": random_regular, "erdos_renyi": erdos_renyi, "small_world": small_world,
    "barabasi_albert": barabasi_albert, "exponential": exponential, "hypercube": hypercube,
    "edge_list": edge_list, "random_matching": random_matching,
}, runtime=("n", "rng"))


def check_connected(graph: Graph, where: str) -> None:
    """Raise a one-line ConfigError when the graph is not (strongly) connected."""
    count = graph.num_components()
    if count > 1:
        kind = "strongly connected " if graph.directed else ""
        raise ConfigError(
            f"{where}: graph with {graph.num_nodes} nodes is disconnected ({count} "
            f"{kind}components); pick a denser topology or larger degree/p/k, or allow it")


# --- Scheduled failures --------------------------------------------------------------------


@dataclass(frozen=True)
class Outage:
    """A failure window over rounds [start, stop): drop a seeded `fraction` of the edges,
    and/or (parts >= 2) cut the nodes into `parts` contiguous id blocks."""

    start: int
    stop: int
    fraction: float = 0.0
    parts: int = 0

    def __post_init__(self) -> None:
        _need(_is_int(self.start) and self.start >= 0, "outages.start", "an integer >= 0",
              self.start)
        _need(_is_int(self.stop) and self.stop > self.start, "outages.stop",
              f"an integer > start = {self.start}", self.stop)
        _need(0 <= self.fraction <= 1, "outages.fraction", "a fraction in [0, 1]", self.fraction)
        _need(_is_int(self.parts) and (self.parts == 0 or self.parts >= 2), "outages.parts",
              "0 (no partition) or an integer >= 2", self.parts)


class OutageLike(Protocol):
    """Outage or engine.core.config.OutageConfig: anything with these four fields."""

    start: int
    stop: int
    fraction: float
    parts: int


def apply_outages(graph: Graph, round_idx: int, outages: Sequence[OutageLike],
                  rng: np.random.Generator) -> Graph:
    """The graph of round `round_idx` under every outage whose window holds it.

    The caller passes a generator of its own to each (outage index, round), e.g.
    `seeds.rng("outage", i, round)`, calling this once per outage (`[outages[i]]`), so the
    edges dropped depend only on (seed, i, round) and not on call order. Given several active
    outages at once, their fractions draw from `rng` in list order. Each fraction is of the
    edges of `graph` as given (not of what another outage in the same call left), and a
    directed graph's arcs u -> v and v -> u count as one edge and go together."""
    drop = np.zeros(graph.num_arcs, dtype=bool)
    for outage in outages:
        if not outage.start <= round_idx < outage.stop:
            continue
        if outage.fraction > 0:
            drop |= _random_edges(graph, outage.fraction, rng)
        if outage.parts >= 2:
            drop |= _cut_arcs(graph, outage.parts)
    return graph.without_arcs(drop) if drop.any() else graph


def _random_edges(graph: Graph, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Arc mask of round(fraction * edges) edges chosen uniformly without replacement."""
    pairs, inverse = _unique(_pair_keys(graph))
    count = int(np.floor(fraction * pairs.size + 0.5))
    chosen = np.zeros(pairs.size, dtype=bool)
    chosen[rng.permutation(pairs.size)[:count]] = True
    return chosen[inverse]


def _cut_arcs(graph: Graph, parts: int) -> np.ndarray:
    """Arc mask of the arcs between the `parts` contiguous, near-equal id blocks."""
    block = np.arange(graph.num_nodes, dtype=np.int64) * parts // graph.num_nodes
    return block[graph.src] != block[graph.dst]
