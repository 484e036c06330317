"""Aggregation platforms (scenarios/platforms.py): LIFL's aggregator tree and the always-on
server timed by hand over a few arrivals; the model's bits do not depend on the platform."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from engine.core.errors import ConfigError
from engine.experiment import run_experiment
from engine.records.logs import read_table
from engine.resolve import resolve
from scenarios.platforms import Timing, always_on, lifl
from tests.conftest import small_config
from tests.test_world_loop import INLINE, devices_file, world_of

# 100 B updates: 1 s to add one (100 B/s), a cross-node hop 0.5 + 100 / 100 = 1.5 s
ARRIVALS = np.array([3.0, 0.0, 10.0, 1.0, 2.0])
HAND = dict(fan_in=2, per_node=2, cold_start_s=0.5, aggregate_bps=100.0, shm_s=0.25,
            network_bps=100.0, network_latency_s=0.5)


def test_lifl_tree_by_hand_packed():
    """Leaves {0, 1} {2, 3} on node 0, {10} on node 1. L0: up at 0.5, adds at 1.5, 2.5.
    L1: up at 2.5, done 4.5. L2: up at 10.5, done 11.5. Level 1: L0 (first) takes L1's over
    shared memory at 4.75 -> 5.75; L2 goes up alone. Root: L0 takes L2 across nodes at 13
    -> 14. Latency 14 - 10. CPU-seconds: 3 cold starts 1.5, 5 + 2 adds 7, hops 0.25 + 1.5."""
    timing = lifl(placement="pack", **HAND).timing(ARRIVALS, 100, 10.0)
    assert timing == Timing(4.0, 10.25, 3)


def test_lifl_tree_by_hand_spread():
    """Round-robin over 2 nodes: L1 on node 1, L2 on node 0. L1's aggregate crosses nodes
    (4.5 + 1.5 = 6 -> L0 done 7); L2's goes over shared memory (11.75 -> 12.75). Latency
    2.75; the same CPU-seconds (one hop of each kind)."""
    timing = lifl(placement="spread", **HAND).timing(ARRIVALS, 100, 10.0)
    assert timing == Timing(2.75, 10.25, 3)


def test_always_on_by_hand():
    """One aggregator adds each update as it comes: done at 1, 2, 3, 4, then 10 + 1 = 11;
    latency 1; held from the round's start to 11 (or to the close if later)."""
    assert always_on(aggregate_bps=100.0).timing(ARRIVALS, 100, 10.0) == Timing(1.0, 11.0, 1)
    assert always_on(aggregate_bps=100.0).timing(np.zeros(0), 100, 7.0) == Timing(0.0, 7.0, 1)


def test_lifl_scales_out_where_one_aggregator_queues():
    """64 updates arriving together: the always-on server adds them one by one (64 s); LIFL's
    tree of fan-in 4 takes 3 levels of 4 adds (the leaves' cold start, 3 hops); its
    CPU-seconds (16 cold starts, 64 + 15 adds, 3 hops) are under the always-on server's 164
    (up from the round's start)."""
    arrivals = np.full(64, 100.0)
    one = always_on(aggregate_bps=100.0).timing(arrivals, 100, 100.0)
    tree = lifl(fan_in=4, per_node=4, cold_start_s=0.5, aggregate_bps=100.0, shm_s=0.0,
                network_bps=100.0, network_latency_s=0.0).timing(arrivals, 100, 100.0)
    assert one.latency_s == 64.0
    # leaves 0.5 + 4; level 2: 3 adds over shm (node of 4 leaves); root: 3 hops of 1 s + 3 adds
    assert tree.latency_s == pytest.approx(4.5 + 3 + 1 + 3)
    assert (one.aggregator_s, tree.aggregator_s, tree.instances) == (164.0, 8 + 79 + 3, 16)


def test_platform_times_the_round_not_the_model(tmp_path):
    """The round lasts until the model is ready (close + latency); the model's bits and the
    other columns are those of the run without a platform."""
    path = devices_file(tmp_path, [0.01] * 20)
    base = dict(rounds=2, eval_every=0, devices={"path": path})
    lifl_cfg = small_config(**base, server={"platform": {"kind": "lifl", "cold_start_s": 0.3}})
    plain = small_config(**base)
    world = world_of(lifl_cfg, [20] * 20)
    plan, ref = world.plan(0), world_of(plain, [20] * 20).plan(0)
    latency, held = plan.aggregation
    assert latency >= 0.3 and held > 0 and ref.aggregation is None
    assert plan.duration_s == pytest.approx(ref.duration_s + latency)
    a = run_experiment(lifl_cfg, INLINE, tmp_path / "a", False)
    b = run_experiment(plain, INLINE, tmp_path / "b", False)
    assert torch.equal(a.loop.params, b.loop.params)
    rounds = read_table(a.log_dir, "rounds")
    assert pc.min(rounds["aggregation_latency_s"]).as_py() >= 0.3
    assert read_table(b.log_dir, "rounds")["aggregator_s"].null_count == 2


def test_platform_is_refused_where_unused():
    cfg = small_config(server={"mode": "fedbuff", "buffer": 2, "platform": {"kind": "lifl"}})
    with pytest.raises(ConfigError, match="server.platform.*FedBuff"):
        resolve(cfg)
    with pytest.raises(ConfigError, match="fan_in"):
        resolve(small_config(server={"platform": {"kind": "lifl", "fan_in": 1}}))
