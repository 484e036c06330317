"""Communication graphs and mixing matrices against hand-computed values, closed-form spectra
and networkx as an independent reference (for graphs not built with it)."""

import time

import networkx as nx
import numpy as np
import pytest

from engine.core.errors import ConfigError
from scenarios.mixing import (
    MIXING,
    degree_stats,
    max_degree,
    metropolis_hastings,
    mixing_matrix,
    push_sum,
    spectral_gap,
)
from scenarios.topology import (
    TOPOLOGIES,
    Graph,
    Outage,
    apply_outages,
    barabasi_albert,
    check_connected,
    complete,
    edge_list,
    erdos_renyi,
    exponential,
    grid,
    hypercube,
    random_matching,
    random_regular,
    ring,
    small_world,
    star,
    torus,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def edge_set(graph: Graph) -> set[tuple[int, int]]:
    """Unordered pairs of an undirected graph (each checked to be stored both ways)."""
    arcs = set(zip(graph.src.tolist(), graph.dst.tolist(), strict=True))
    assert all((v, u) in arcs for u, v in arcs)
    return {(min(u, v), max(u, v)) for u, v in arcs}


def to_nx(graph: Graph) -> nx.Graph:
    g = nx.DiGraph() if graph.directed else nx.Graph()
    g.add_nodes_from(range(graph.num_nodes))
    g.add_edges_from(zip(graph.src.tolist(), graph.dst.tolist(), strict=True))
    return g


def two_rings() -> Graph:
    i = np.arange(5)
    return Graph.from_arcs(10, np.r_[i, i + 5], np.r_[(i + 1) % 5, (i + 1) % 5 + 5], False)


# --- Graph normalisation -------------------------------------------------------------------


def test_from_arcs_normalises():
    g = Graph.from_arcs(4, [2, 0, 0, 3, 1, 1], [0, 2, 2, 3, 2, 0], directed=False)
    # self-loop 3->3 and the repeated 0-2 are gone; both directions stored; (dst, src) order
    assert g.dst.tolist() == [0, 0, 1, 1, 2, 2]
    assert g.src.tolist() == [1, 2, 0, 2, 0, 1]
    assert g.num_edges == 3 and g.num_arcs == 6
    d = Graph.from_arcs(3, [0, 0, 2], [1, 1, 1], directed=True)
    assert d.src.tolist() == [0, 2] and d.dst.tolist() == [1, 1] and d.num_edges == 2
    assert d.in_degree().tolist() == [0, 2, 0] and d.out_degree().tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        Graph.from_arcs(3, [0], [3], directed=True)


def test_adjacency_rows_are_receivers():
    a = Graph.from_arcs(3, [0, 0], [1, 2], directed=True).adjacency().toarray()
    assert a.tolist() == [[0, 0, 0], [1, 0, 0], [1, 0, 0]]


def test_graph_is_frozen_and_compares_by_value():
    assert ring(6) == ring(6) and ring(6) != ring(7)
    with pytest.raises(ValueError):
        ring(6).src[0] = 3


def test_without_arcs_drops_both_directions_of_an_edge():
    g = ring(5)
    first = (g.src == 1) & (g.dst == 0)  # one direction of edge {0, 1}
    h = g.without_arcs(first)
    assert edge_set(h) == edge_set(g) - {(0, 1)}


def test_restricted_keeps_ids_and_drops_every_arc_of_the_dead():
    alive = np.ones(8, dtype=bool)
    alive[[2, 5]] = False
    h = complete(8).restricted(alive)
    assert h.num_nodes == 8
    assert h.num_edges == 15  # K_6 among the living
    assert h.in_degree()[[2, 5]].tolist() == [0, 0]


# --- Deterministic generators ----------------------------------------------------------------


@pytest.mark.parametrize(("graph", "degree", "edges"), [
    (ring(10), 2, 10),
    (torus(12), 4, 24),     # 3 x 4
    (torus(36), 4, 72),     # 6 x 6
    (complete(7), 6, 21),
    (hypercube(32), 5, 80),
])
def test_regular_graphs_degree_and_edges(graph, degree, edges):
    assert (graph.in_degree() == degree).all() and (graph.out_degree() == degree).all()
    assert graph.num_edges == edges
    assert graph.is_connected()
    assert dict(to_nx(graph).degree()) == dict.fromkeys(range(graph.num_nodes), degree)


@pytest.mark.parametrize(("n", "rows", "cols"), [(12, 3, 4), (36, 6, 6), (30, 5, 6)])
def test_torus_and_grid_match_networkx(n, rows, cols):
    relabel = {(r, c): r * cols + c for r in range(rows) for c in range(cols)}
    for periodic, build in ((True, torus), (False, grid)):
        ref = nx.relabel_nodes(nx.grid_2d_graph(rows, cols, periodic=periodic), relabel)
        assert edge_set(build(n)) == {(min(u, v), max(u, v)) for u, v in ref.edges()}


def test_grid_edge_count():
    assert grid(12).num_edges == 3 * 3 + 2 * 4  # rows*(cols-1) + (rows-1)*cols


def test_hypercube_matches_networkx():
    ref = nx.hypercube_graph(4)  # nodes are bit tuples
    relabel = {node: int("".join(map(str, node)), 2) for node in ref}
    ref = nx.relabel_nodes(ref, relabel)
    assert edge_set(hypercube(16)) == {(min(u, v), max(u, v)) for u, v in ref.edges()}


def test_star():
    g = star(9)
    assert g.in_degree().tolist() == [8] + [1] * 8
    assert g.num_edges == 8
    assert degree_stats(star(5)) == (1, 8 / 5, 4)


@pytest.mark.parametrize(("n", "hops"), [(2, [1]), (9, [1, 2, 4, 8]), (12, [1, 2, 4, 8]),
                                         (17, [1, 2, 4, 8, 16]), (64, [1, 2, 4, 8, 16, 32])])
def test_exponential_graph(n, hops):
    g = exponential(n)
    assert g.directed
    assert len(hops) == int(np.floor(np.log2(n - 1))) + 1
    assert (g.out_degree() == len(hops)).all() and (g.in_degree() == len(hops)).all()
    assert g.num_edges == n * len(hops)
    assert sorted(g.dst[g.src == 1].tolist()) == sorted((1 + h) % n for h in hops)
    assert nx.is_strongly_connected(to_nx(g)) and g.is_connected()


# --- Random generators -----------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d"), [(20, 3), (101, 4), (50, 6)])
def test_random_regular(n, d):
    g = random_regular(n, rng(1), degree=d)
    assert (g.in_degree() == d).all()
    assert g.num_edges == n * d // 2
    assert set(dict(to_nx(g).degree()).values()) == {d}
    assert random_regular(n, rng(1), degree=d) == g


def test_random_regular_is_fast_at_10k():
    start = time.perf_counter()
    g = random_regular(10_000, rng(0), degree=4)
    assert time.perf_counter() - start < 1.0
    assert (g.in_degree() == 4).all()


def test_erdos_renyi_count_and_reproducibility():
    n, p = 400, 0.05
    g = erdos_renyi(n, rng(3), p=p)
    mean = p * n * (n - 1) / 2
    assert abs(g.num_edges - mean) < 5 * np.sqrt(mean * (1 - p))  # 5 sd of Binomial(M, p)
    assert erdos_renyi(n, rng(3), p=p) == g
    assert erdos_renyi(n, rng(4), p=p) != g
    assert (g.src != g.dst).all()
    # rows are not biased: the first and last quarter of the ids have similar degrees
    deg = g.in_degree()
    assert abs(deg[:100].mean() - deg[-100:].mean()) < 3


def test_erdos_renyi_extremes_and_large_n():
    assert erdos_renyi(30, rng(0), p=1.0) == complete(30)
    assert erdos_renyi(30, rng(0), p=0.0).num_edges == 0
    start = time.perf_counter()
    g = erdos_renyi(10_000, rng(0), p=0.001)
    assert time.perf_counter() - start < 1.0
    mean = 0.001 * 10_000 * 9_999 / 2
    assert abs(g.num_edges - mean) < 5 * np.sqrt(mean)


def test_small_world_without_rewiring_is_the_ring_lattice():
    n, k = 20, 6
    i = np.arange(n)
    lattice = Graph.from_arcs(n, np.tile(i, 3), np.r_[i + 1, i + 2, i + 3] % n, False)
    assert small_world(n, rng(0), k=k, beta=0.0) == lattice
    ref = nx.watts_strogatz_graph(n, k, 0.0)
    assert edge_set(lattice) == {(min(u, v), max(u, v)) for u, v in ref.edges()}
    assert small_world(n, rng(0), k=2, beta=0.0) == ring(n)


def test_small_world_rewiring_keeps_the_edge_count():
    g = small_world(200, rng(5), k=4, beta=0.3)
    lattice = small_world(200, rng(5), k=4, beta=0.0)
    assert g.num_edges == 400
    moved = len(edge_set(g) - edge_set(lattice))
    assert 0.3 * 400 - 5 * np.sqrt(400 * 0.3 * 0.7) < moved <= 0.3 * 400 + 5 * np.sqrt(84)
    assert small_world(200, rng(5), k=4, beta=0.3) == g


def test_barabasi_albert():
    n, m = 300, 3
    g = barabasi_albert(n, rng(2), m=m)
    # node m links to the m seeds, each of nodes m+1..n-1 adds m new edges
    assert g.num_edges == m + m * (n - m - 1) == m * (n - m)
    assert g.in_degree()[m:].min() >= m
    assert nx.is_connected(to_nx(g))
    assert g.in_degree().max() > 5 * m  # preferential attachment grows hubs
    assert barabasi_albert(n, rng(2), m=m) == g


def test_barabasi_albert_attaches_in_proportion_to_degree():
    # m = 1: 1 -> 0, 2 -> 0 or 1; then the degrees are (2, 1, 1) up to order, so node 3
    # attaches to node 2 with probability 1/4 and to node 2's target with probability 1/2
    trials, to_two, to_hub = 4000, 0, 0
    for seed in range(trials):
        edges = edge_set(barabasi_albert(4, rng(seed), m=1))
        (hub,) = [u for u in (0, 1) if (u, 2) in edges]
        (target,) = [u for u in (0, 1, 2) if (u, 3) in edges]
        to_two += target == 2
        to_hub += target == hub
    assert abs(to_two - trials / 4) < 5 * np.sqrt(trials * 0.25 * 0.75)
    assert abs(to_hub - trials / 2) < 5 * np.sqrt(trials * 0.5 * 0.5)


def test_connectivity_matches_networkx():
    for seed in range(6):
        g = erdos_renyi(60, rng(seed), p=0.04)  # near the threshold ln(n)/n: both outcomes
        assert g.num_components() == nx.number_connected_components(to_nx(g))
    path = Graph.from_arcs(4, [0, 1, 2], [1, 2, 3], directed=True)
    assert not path.is_connected() and not nx.is_strongly_connected(to_nx(path))
    assert path.num_components() == 4


# --- Per-round graphs and outages ------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 11])
def test_random_matching(n):
    g = random_matching(n, rng(n))
    deg = g.in_degree()
    assert deg.max() == 1 and deg.sum() == n - n % 2
    assert g.num_edges == n // 2
    assert random_matching(n, rng(n + 1)) != g


def test_random_matching_is_uniform_on_four_nodes():
    counts: dict[frozenset, int] = {}
    generator = rng(9)
    for _ in range(3000):
        key = frozenset(edge_set(random_matching(4, generator)))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 3
    assert all(abs(c - 1000) < 5 * np.sqrt(3000 * (1 / 3) * (2 / 3)) for c in counts.values())


def outage_rng(i: int, round_idx: int) -> np.random.Generator:
    """What the caller passes: one generator per (outage index, round)."""
    return np.random.default_rng([42, i, round_idx])


def with_outages(graph: Graph, round_idx: int, outages: list[Outage]) -> Graph:
    """The caller's loop: one outage at a time, each with its own generator."""
    for i, outage in enumerate(outages):
        graph = apply_outages(graph, round_idx, [outage], outage_rng(i, round_idx))
    return graph


def test_fraction_outage_only_inside_its_window():
    g = random_regular(100, rng(0), degree=4)  # 200 edges
    outages = [Outage(start=2, stop=5, fraction=0.25)]
    for r in (0, 1, 5, 9):
        assert with_outages(g, r, outages) == g
    dropped = {}
    for r in (4, 2, 3):  # any order: each round has its own generator
        h = with_outages(g, r, outages)
        assert h.num_edges == 150 and edge_set(h) <= edge_set(g)
        dropped[r] = edge_set(g) - edge_set(h)
    assert with_outages(g, 3, outages) == g.without_arcs(
        np.isin(g.src * 100 + g.dst, [u * 100 + v for u, v in dropped[3]]))
    assert dropped[2] != dropped[3]


def test_fraction_outage_on_a_directed_graph_drops_both_directions():
    g = exponential(8)  # i -> i+4 and i+4 -> i are one edge {i, i+4}
    h = with_outages(g, 0, [Outage(0, 1, fraction=1.0)])
    assert h.num_arcs == 0
    h = with_outages(g, 0, [Outage(0, 1, fraction=0.5)])
    arcs = set(zip(h.src.tolist(), h.dst.tolist(), strict=True))
    assert all((v, u) in arcs for u, v in arcs if (u - v) % 8 == 4)


def test_partition_outage_cuts_between_blocks():
    g = random_regular(100, rng(1), degree=6)
    h = with_outages(g, 7, [Outage(5, 10, parts=2)])
    block = np.arange(100) // 50
    assert (block[h.src] == block[h.dst]).all()
    within = block[g.src] == block[g.dst]
    assert h.num_arcs == within.sum()
    assert h.num_components() >= 2
    both = with_outages(g, 7, [Outage(0, 3, fraction=0.5), Outage(5, 10, parts=2)])
    assert both == h  # the first outage is over by round 7


def test_outages_active_together_in_one_call():
    g = random_regular(100, rng(1), degree=6)  # 300 edges
    outages = [Outage(5, 10, fraction=0.5), Outage(5, 10, parts=2)]
    h = apply_outages(g, 6, outages, outage_rng(0, 6))
    block = np.arange(100) // 50
    assert (block[h.src] == block[h.dst]).all() and h.num_edges <= 150
    assert apply_outages(g, 6, outages, outage_rng(0, 6)) == h


def test_outage_validation():
    with pytest.raises(ConfigError, match="topology.outages.parts"):
        Outage(0, 5, parts=1)
    with pytest.raises(ConfigError, match="topology.outages.stop"):
        Outage(5, 5)
    with pytest.raises(ConfigError, match="topology.outages.fraction"):
        Outage(0, 5, fraction=1.5)


# --- Edge list files -------------------------------------------------------------------------


def test_edge_list_loads(tmp_path):
    path = tmp_path / "edges.csv"
    path.write_text("# a path and a chord\n0 1\n1,2   # trailing comment\n\n2 3\n3 0\n1 0\n")
    g = edge_list(4, None, path=str(path))
    assert edge_set(g) == {(0, 1), (1, 2), (2, 3), (0, 3)} and not g.directed
    d = TOPOLOGIES.make("edge_list", path=str(path), directed=True)(4, rng())
    assert d.directed and d.num_edges == 5


@pytest.mark.parametrize(("text", "line", "what"), [
    ("0 1\n1 x\n", 2, "expected two integer node ids"),
    ("0 1\n\n# c\n1 2 3\n", 4, "expected two integer node ids"),
    ("0 1\n1 4\n", 2, "node id 4 is outside"),
    ("-1 0\n", 1, "node id -1 is outside"),
])
def test_edge_list_bad_line(tmp_path, text, line, what):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"topology.path: .*bad.txt line {line}: {what}"):
        edge_list(4, None, path=str(path))


def test_edge_list_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="topology.path: cannot read .*nope.txt"):
        edge_list(4, None, path=str(tmp_path / "nope.txt"))
    with pytest.raises(ConfigError, match="topology.path"):
        edge_list(4, None)


# --- Validation ------------------------------------------------------------------------------


def test_check_connected():
    with pytest.raises(ConfigError) as err:
        check_connected(two_rings(), "topology")
    message = str(err.value)
    assert message.startswith("topology: graph with 10 nodes is disconnected (2 components)")
    assert "\n" not in message
    check_connected(ring(10), "topology")


@pytest.mark.parametrize(("call", "key"), [
    (lambda: torus(13), "population.num_clients"),
    (lambda: grid(7), "population.num_clients"),
    (lambda: hypercube(12), "population.num_clients"),
    (lambda: ring(2), "population.num_clients"),
    (lambda: random_regular(11, rng(), degree=3), "topology.degree"),
    (lambda: random_regular(5, rng(), degree=5), "topology.degree"),
    (lambda: erdos_renyi(10, rng(), p=1.5), "topology.p"),
    (lambda: small_world(10, rng(), k=3, beta=0.1), "topology.k"),
    (lambda: small_world(10, rng(), k=4, beta=-0.1), "topology.beta"),
    (lambda: barabasi_albert(10, rng(), m=10), "topology.m"),
    (lambda: TOPOLOGIES.make("moebius", "topology"), "topology.kind"),
    (lambda: TOPOLOGIES.make("ring", "topology", degree=3), "topology.degree"),
])
def test_bad_parameters_are_one_line_config_errors(call, key):
    with pytest.raises(ConfigError, match=key) as err:
        call()
    assert "\n" not in str(err.value)


def test_torus_on_a_prime_asks_for_a_composite():
    with pytest.raises(ConfigError, match="composite"):
        torus(13)


def test_registry_builds_every_kind():
    for kind in TOPOLOGIES.names():
        if kind != "edge_list":
            assert TOPOLOGIES.make(kind)(16, rng(1)).num_nodes == 16, kind


# --- Mixing matrices -------------------------------------------------------------------------


def irregular_graphs() -> list[Graph]:
    return [ring(9), star(7), grid(12), barabasi_albert(60, rng(0), m=2),
            erdos_renyi(50, rng(1), p=0.1), small_world(40, rng(2), k=4, beta=0.5)]


@pytest.mark.parametrize("graph", irregular_graphs())
@pytest.mark.parametrize("build", [metropolis_hastings, max_degree])
def test_symmetric_weights_are_doubly_stochastic(graph, build):
    w = build(graph).toarray()
    assert np.allclose(w, w.T, atol=0)
    assert np.allclose(w.sum(axis=0), 1, atol=1e-12) and np.allclose(w.sum(axis=1), 1, atol=1e-12)
    assert (w >= 0).all()
    assert ((w > 0) == (graph.adjacency().toarray() + np.eye(graph.num_nodes) > 0)).all()
    x = rng(3).normal(size=graph.num_nodes)
    assert np.ones(graph.num_nodes) @ (w @ x) == pytest.approx(x.sum(), abs=1e-12)


def test_metropolis_hastings_by_hand():
    # star on 4 nodes: hub degree 3, leaves 1 -> every edge 1/(1+3); hub keeps 1/4, leaves 3/4
    w = metropolis_hastings(star(4)).toarray()
    expected = np.full((4, 4), 0.0)
    expected[0, :] = expected[:, 0] = 0.25
    expected[[1, 2, 3], [1, 2, 3]] = 0.75
    assert np.allclose(w, expected, atol=0)
    # path 0-1-2 (grid needs 2 rows, so build it): edges 1/(1+2)
    path = Graph.from_arcs(3, [0, 1], [1, 2], False)
    assert np.allclose(metropolis_hastings(path).toarray(),
                       [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])


def test_max_degree_by_hand():
    w = max_degree(grid(6)).toarray()  # 2 x 3: corners degree 2, middles 3; d_max = 3
    degree = np.array([2, 3, 2, 2, 3, 2])
    assert np.allclose(np.diag(w), 1 - degree / 4)
    assert np.allclose(w[0, 1], 0.25) and w[0, 4] == 0


def test_symmetric_mixings_refuse_a_directed_graph():
    for build in (metropolis_hastings, max_degree):
        with pytest.raises(ConfigError, match="push_sum"):
            build(exponential(8))


def test_push_sum_is_column_stochastic_and_recovers_the_average():
    g = exponential(12)  # out-degree 4
    w = push_sum(g)
    dense = w.toarray()
    assert np.allclose(dense.sum(axis=0), 1, atol=1e-14)
    assert np.allclose(dense[dense > 0], 1 / 5)
    x = rng(4).normal(size=(12, 3))
    weights = np.ones(12)
    target = x.mean(axis=0)
    for _ in range(60):
        x, weights = w @ x, w @ weights
    assert np.abs(x / weights[:, None] - target).max() < 1e-10
    assert x.sum(axis=0) == pytest.approx(target * 12, abs=1e-12)  # push-sum keeps the sum


def test_push_sum_on_an_irregular_directed_graph():
    g = Graph.from_arcs(4, [0, 0, 1, 2, 3], [1, 2, 2, 3, 0], directed=True)
    dense = push_sum(g).toarray()
    assert np.allclose(dense.sum(axis=0), 1)
    assert dense[1, 0] == dense[2, 0] == dense[0, 0] == pytest.approx(1 / 3)
    x, weights = np.arange(4.0), np.ones(4)
    for _ in range(400):
        x, weights = dense @ x, dense @ weights
    assert np.allclose(x / weights, 1.5, atol=1e-10)


@pytest.mark.parametrize("kind", MIXING.names())
def test_dead_peers_get_identity_rows_and_columns(kind):
    g = random_regular(20, rng(0), degree=4)
    alive = np.ones(20, dtype=bool)
    alive[[3, 7]] = False
    w = mixing_matrix(g, MIXING[kind], alive).toarray()
    for dead in (3, 7):
        assert w[dead].tolist() == np.eye(20)[dead].tolist()
        assert w[:, dead].tolist() == np.eye(20)[dead].tolist()
    assert np.allclose(w[alive][:, alive].sum(axis=0 if kind == "push_sum" else 1), 1)
    assert mixing_matrix(g, MIXING[kind], None).nnz == 20 + g.num_arcs


def test_unknown_mixing():
    with pytest.raises(ConfigError, match="gossip.mixing: unknown mixing 'avg'"):
        MIXING.spec("avg", "gossip.mixing")


# --- Spectral gap ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [5, 8, 13, 30, 101])
def test_ring_gap_closed_form(n):
    # MH on C_n is (I + A) / 3, eigenvalues 1/3 + 2/3 cos(2 pi k / n)
    gap = spectral_gap(metropolis_hastings(ring(n)))
    assert gap == pytest.approx(1 - (1 / 3 + 2 / 3 * np.cos(2 * np.pi / n)), abs=1e-12)


def test_complete_and_torus_gaps():
    assert spectral_gap(metropolis_hastings(complete(10))) == pytest.approx(1.0, abs=1e-12)
    # 8 x 8 torus: (I + A) / 5 with A's eigenvalues 2 cos(2 pi a / 8) + 2 cos(2 pi b / 8)
    torus_gap = spectral_gap(metropolis_hastings(torus(64)))
    assert torus_gap == pytest.approx(2 * (1 - np.cos(2 * np.pi / 8)) / 5, abs=1e-12)
    ring_gap = spectral_gap(metropolis_hastings(ring(64)))
    complete_gap = spectral_gap(metropolis_hastings(complete(64)))
    assert ring_gap < torus_gap < complete_gap


def test_disconnected_gap_is_zero():
    assert spectral_gap(metropolis_hastings(two_rings())) == 0.0
    alive = np.ones(10, dtype=bool)
    alive[0] = False
    assert spectral_gap(mixing_matrix(ring(10), metropolis_hastings, alive)) == 0.0


def test_gap_uses_magnitudes():
    # a swap of two peers: eigenvalues +1 and -1, so it never mixes (gap 0, not 2)
    assert spectral_gap(np.array([[0.0, 1.0], [1.0, 0.0]])) == 0.0
    # star MH (n = 4): eigenvalues 1, 3/4, 3/4, 0 -> gap 1/4
    assert spectral_gap(metropolis_hastings(star(4))) == pytest.approx(0.25, abs=1e-12)
    # max-degree on K_2 with d_max = 1: [[1/2, 1/2], [1/2, 1/2]] -> eigenvalues 1, 0
    assert spectral_gap(max_degree(complete(2))) == pytest.approx(1.0, abs=1e-12)


def circulant_gap(n: int, hops: list[int]) -> float:
    """Push-sum on a circulant graph: W's first column has 1/(d+1) at 0 and at each hop, and
    its eigenvalues are that column's DFT."""
    column = np.zeros(n)
    column[[0, *hops]] = 1 / (len(hops) + 1)
    magnitudes = np.sort(np.abs(np.fft.fft(column)))[::-1]
    return 1 - magnitudes[1]


def test_push_sum_gap_matches_the_circulant_spectrum():
    assert spectral_gap(push_sum(exponential(12))) == pytest.approx(
        circulant_gap(12, [1, 2, 4, 8]), abs=1e-10)


def test_large_graphs_use_arpack():
    # hypercube Q_12 (4096 nodes): MH = (I + A) / 13, A's eigenvalues 12 - 2k -> gap 2/13
    assert spectral_gap(metropolis_hastings(hypercube(4096))) == pytest.approx(2 / 13, abs=1e-8)
    hops = [1 << k for k in range(12)]  # 2^k <= 2999
    assert spectral_gap(push_sum(exponential(3000))) == pytest.approx(
        circulant_gap(3000, hops), abs=1e-8)
    # a long ring's gap (~4e-6) does not converge in 2 restarts: nan, as documented
    assert np.isnan(spectral_gap(metropolis_hastings(ring(3000)), maxiter=2))
