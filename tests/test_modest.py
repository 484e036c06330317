"""MoDeST (consensus=modest) in full: samples and aggregators from a seeded order of the
online peers, the success fraction and its timeout, faults, and the round's model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from engine.backends.runtime import RuntimeOptions
from engine.compute.training import LocalSGD
from engine.core.config import build_config
from engine.core.events import AGGREGATION_DROPPED, CRASH, LOST_UPLINK
from engine.core.seeds import SeedTree
from engine.experiment import run_experiment
from engine.loops.sampling import SampledWorld
from engine.protocols.worlds import build_peer_world
from engine.records.logs import read_table
from engine.resolve import resolve
from policies.consensus import Sampling
from tests.conftest import small_raw

PEERS = 12
INLINE = RuntimeOptions("inline", 1)


def modest_config(rounds: int = 3, **sections):
    raw = small_raw(mode="decentralized", population={"num_clients": PEERS},
                    topology={"kind": "ring"}, gossip={"eval_peers": 4}, rounds=rounds,
                    **sections)
    raw["population"].pop("participation", None)
    raw.setdefault("consensus", {"modest": {"sample_size": 4}})
    return build_config(raw)


def world_of(cfg) -> SampledWorld:
    sizes = np.full(PEERS, 50)
    world = build_peer_world(cfg, sizes, LocalSGD(1, 8, 0.1), 4000, resolve(cfg))
    assert isinstance(world, SampledWorld)
    return world


def order(seed: int, r: int) -> np.ndarray:
    return SeedTree(seed).rng("sample", r).permutation(PEERS)


def test_samples_aggregators_and_w_follow_the_seeded_order():
    cfg = modest_config(consensus={"modest": {"sample_size": 4, "aggregators": 2}})
    world = world_of(cfg)
    plan = world.plan(0)
    s0, s1 = order(cfg.seed, 0)[:4], order(cfg.seed, 1)[:4]
    np.testing.assert_array_equal(plan.trainers, np.sort(s0))
    assert plan.evaluated in s1[:2]  # the first of the two aggregators to deliver
    expected = np.eye(PEERS)
    expected[s1] = 0.0
    expected[np.ix_(s1, s0)] = 0.25
    np.testing.assert_array_equal(plan.w.toarray(), expected)
    # S_1 received the aggregate: exactly they train next
    np.testing.assert_array_equal(world.plan(1).trainers, np.sort(s1))


def test_offline_peers_are_skipped_in_the_order():
    cfg = modest_config(failures={"crash": {"rate": 0.3}})
    world = world_of(cfg)
    up = world.online(0)[0]
    s0 = [int(p) for p in order(cfg.seed, 0) if up[p]][:4]
    assert not up.all()  # the seed crashes someone in round 0
    plan = world.plan(0)
    np.testing.assert_array_equal(plan.trainers, np.sort(s0))
    assert plan.events.count(CRASH) == int((~up).sum())


@pytest.mark.parametrize("arrivals, deadline, expected_ids, expected_done", [
    ([3.0, 1.0, 2.0, 0.5], None, [3, 1, 2], 2.0),  # needed = 3: the third arrival closes it
    ([9.0, 1.0], None, [1], 6.0),  # too few: first arrival + timeout; 9.0 came after it
    ([3.0, 1.0, 2.0, 0.5], 1.5, [3, 1], 1.5),  # the round's deadline comes first
    ([], None, [], None),
])
def test_success_fraction_and_timeout_by_hand(arrivals, deadline, expected_ids, expected_done):
    world = object.__new__(SampledWorld)
    world.world = SimpleNamespace(deadline_s=deadline)
    world.sampling = Sampling(sample_size=4, success_fraction=0.8, timeout_s=5.0)
    assert world.sampling.needed == 3  # floor(4 * 0.8)
    ids, done = world._aggregated(np.arange(len(arrivals)), np.array(arrivals))
    assert ids.tolist() == expected_ids and done == expected_done


def test_too_few_models_by_the_timeout_drop_the_round():
    """Everyone's uplink lost: no aggregate; the next sample starts from its own models."""
    cfg = modest_config(failures={"uplink_loss": 1.0})
    world = world_of(cfg)
    plan = world.plan(0)
    assert plan.evaluated is None and world.holders is None
    assert plan.events.count(LOST_UPLINK) == 4
    np.testing.assert_array_equal(plan.w.toarray(), np.eye(PEERS))
    np.testing.assert_array_equal(world.plan(1).trainers, np.sort(order(cfg.seed, 1)[:4]))


def test_a_timeout_with_some_models_aggregates_them():
    cfg = modest_config(consensus={"modest": {"sample_size": 8, "min_models": 2,
                                              "timeout_s": 7.0}},
                        failures={"uplink_loss": 0.5})
    plan = world_of(cfg).plan(0)
    lost = plan.events.count(LOST_UPLINK)
    assert 0 < lost <= 6 and plan.evaluated is not None
    assert plan.duration_s > 7.0  # waited for the timeout, then sent the aggregate
    row = plan.w.toarray()[plan.evaluated]
    assert np.count_nonzero(row) == 8 - lost
    np.testing.assert_allclose(row[row > 0], 1.0 / (8 - lost))


def test_with_every_peer_sampled_modest_is_fedavg_with_equal_weights(tmp_path):
    """A sample of all peers, one aggregator, no faults: each round's aggregate is the plain
    mean of the peers' models trained from the last one, as FedAvg with uniform weights."""
    modest = modest_config(rounds=3, consensus={"modest": {"sample_size": PEERS}})
    fedavg = build_config(small_raw(population={"num_clients": PEERS, "participation": {
        "clients_per_round": PEERS}}, aggregation=["uniform_weights", "fedavg"], rounds=3))
    a = run_experiment(modest, INLINE, tmp_path / "modest", False)
    b = run_experiment(fedavg, INLINE, tmp_path / "fedavg", False)
    np.testing.assert_allclose(a.loop.params.numpy(), b.loop.params.numpy(), atol=2e-5)
    got = read_table(a.log_dir, "rounds")["test_accuracy"].to_pylist()
    want = read_table(b.log_dir, "rounds")["test_accuracy"].to_pylist()
    np.testing.assert_allclose(got, want, atol=0.01)


def test_modest_runs_through_faults_and_logs_its_timeline(tmp_path):
    cfg = modest_config(rounds=4, consensus={"modest": {"sample_size": 6,
                                                        "success_fraction": 0.5}},
                        failures={"crash": {"rate": 0.2, "downtime": {
                            "kind": "constant", "value": 2}}, "message_loss": 0.2})
    result = run_experiment(cfg, INLINE, tmp_path, False)
    rounds = read_table(result.log_dir, "rounds")
    vtime = rounds["virtual_time"].to_pylist()
    assert all(b > a for a, b in zip(vtime, vtime[1:], strict=False))
    assert all(0 < n <= 6 for n in rounds["num_updates"].to_pylist())
    events = read_table(result.log_dir, "events")["kind"].to_pylist()
    assert CRASH in events
    assert np.isfinite(result.loop.final_accuracy)
    assert AGGREGATION_DROPPED not in events  # half the sample suffices here
