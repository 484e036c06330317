"""Asynchronous gossip clocks: event order, Poisson counts, conflict-free levels that give
exactly the one-by-one result."""

from __future__ import annotations

import numpy as np

from scenarios import topology
from scenarios.clocks import GOSSIP, STEP, conflict_free_levels, poisson_events, undirected_edges


def events_of(seed: int, units: int = 1, n: int = 50, edge_rate=1.0, step_rate=2.0):
    edges = undirected_edges(topology.ring(n))
    return poisson_events(edges, n, edge_rate, step_rate, 0.0, float(units),
                          np.random.default_rng(seed)), edges


def test_events_are_seeded_and_ordered_by_time_kind_id():
    a, _ = events_of(3)
    b, _ = events_of(3)
    for col in ("time", "kind", "a", "b"):
        np.testing.assert_array_equal(getattr(a, col), getattr(b, col))
    assert np.all(np.diff(a.time) >= 0)
    assert set(np.unique(a.kind)) == {STEP, GOSSIP}
    gossip = a.kind == GOSSIP
    assert np.all(a.b[~gossip] == -1) and np.all(a.a[gossip] < a.b[gossip])


def test_counts_match_the_poisson_rates():
    """50-peer ring (50 edges), edge rate 1, step rate 2, 200 units of virtual time:
    expected 10,000 exchanges and 20,000 steps (std 100 and 141); 4 std tolerance."""
    ev, _ = events_of(5, units=200)
    exchanges, steps = int((ev.kind == GOSSIP).sum()), int((ev.kind == STEP).sum())
    assert abs(exchanges - 10_000) < 400
    assert abs(steps - 20_000) < 570
    # each edge's clock is its own: per-edge counts have mean 200, variance 200
    per_edge = np.bincount(ev.a[ev.kind == GOSSIP] * 50 + ev.b[ev.kind == GOSSIP])
    per_edge = per_edge[per_edge > 0]
    assert per_edge.size == 50 and abs(per_edge.mean() - 200) < 10
    assert 100 < per_edge.var() < 320


def test_levels_are_conflict_free_and_equal_one_by_one_processing():
    ev, _ = events_of(7, units=3, step_rate=0.0001)
    ev = type(ev)(*(getattr(ev, c)[ev.kind == GOSSIP] for c in ("time", "kind", "a", "b")))
    levels = conflict_free_levels(ev, 50)
    x0 = np.random.default_rng(0).normal(size=(50, 3))
    serial = x0.copy()
    for a, b in zip(ev.a, ev.b, strict=True):
        serial[a] = serial[b] = (serial[a] + serial[b]) / 2
    batched = x0.copy()
    for level in range(levels.max() + 1):
        sel = levels == level
        a, b = ev.a[sel], ev.b[sel]
        assert np.unique(np.concatenate([a, b])).size == 2 * a.size  # disjoint peers
        batched[a] = batched[b] = (batched[a] + batched[b]) / 2
    np.testing.assert_array_equal(batched, serial)
    assert levels.max() + 1 < ev.size / 4  # real batching, not one event per level


def test_clocks_of_different_speeds_tick_in_proportion_to_their_rates():
    """Four peers stepping at 1, 2, 3 and 6 per unit and three edges at 1, 1 and 4, over 400
    units: each clock's count is within 4 std of rate x 400 (std sqrt(rate x 400))."""
    edges = np.array([[0, 1], [1, 2], [2, 3]])
    step, edge = np.array([1.0, 2.0, 3.0, 6.0]), np.array([1.0, 1.0, 4.0])
    ev = poisson_events(edges, 4, edge, step, 0.0, 400.0, np.random.default_rng(3))
    steps = np.bincount(ev.a[ev.kind == STEP], minlength=4)
    exchanges = np.bincount(ev.a[ev.kind == GOSSIP], minlength=3)[:3]
    for counts, rates in ((steps, step), (exchanges, edge)):
        expected = rates * 400
        assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected)), (counts, expected)
    assert np.all(np.diff(ev.time) >= 0)


def test_device_rates_scale_clocks_around_the_median_peer():
    from scenarios.clocks import device_rates

    compute, comm = device_rates(np.array([0.1, 0.2, 0.4]), np.array([1.0, 1.0, 4.0]))
    np.testing.assert_allclose(compute, [2.0, 1.0, 0.5])
    np.testing.assert_allclose(comm, [1.0, 1.0, 0.25])


def test_async_gossip_clocks_follow_the_devices(tmp_path):
    """Heterogeneous step times change which peers step how often, so the run differs from
    the one without devices; devices that are all alike give the run without devices, bit
    for bit (the clocks keep their uniform draws)."""
    from engine.backends.runtime import RuntimeOptions
    from engine.experiment import run_experiment
    from tests.conftest import small_config

    def final(**devices):
        cfg = small_config(mode="decentralized", rounds=3, eval_every=0,
                           population={"num_clients": 12}, topology={"kind": "ring"},
                           gossip={"mode": "async", "eval_peers": 2}, devices=devices)
        result = run_experiment(cfg, RuntimeOptions("inline", 1), tmp_path, False)
        return result.loop.params.numpy()

    plain = final()
    np.testing.assert_array_equal(plain, final(step_s={"kind": "constant", "value": 0.3}))
    skewed = final(step_s={"kind": "lognormal", "median": 0.05, "sigma": 1.5})
    assert not np.array_equal(plain, skewed)
