"""Peer-world additions of issue 18: communication schedules ("A Single Merging Suffices"),
peer-ranked reputation-weighted consensus (Fortytwo) and Bristle's output-layer consensus."""

from __future__ import annotations

import pytest

from engine.backends.runtime import RuntimeOptions
from engine.core.errors import ConfigError
from engine.experiment import run_experiment
from engine.records.logs import read_table
from policies.schedules import gossip_schedule
from tests.conftest import small_config

PEERS = 8


def peers_config(**sections):
    base = {"mode": "decentralized", "population": {"num_clients": PEERS},
            "topology": {"kind": "ring"}, "gossip": {"eval_peers": 2}}
    gossip = {**base["gossip"], **sections.pop("gossip", {})}
    return small_config(**{**base, **sections, "gossip": gossip})


def logged_rounds(tmp_path, cfg, name: str) -> list[dict]:
    root = tmp_path / name
    run_experiment(cfg, RuntimeOptions("inline", 1), root, False)
    return read_table(root / cfg.experiment, "rounds").sort_by("round").select(
        ["consensus_distance", "test_accuracy", "gossip_messages"]).to_pylist()


# ---------------------------------------------------------------- communication schedules


def test_schedules_known_values():
    assert gossip_schedule("constant", 3, steps=2).tolist() == [2, 2, 2]
    # uniform: floor((r + 1) 6 / 4) = 1, 3, 4, 6
    assert gossip_schedule("uniform", 4, budget=6).tolist() == [1, 2, 1, 2]
    # increasing: cumulative 10 r (r + 1) / 20 = 1, 3, 6, 10
    assert gossip_schedule("increasing", 4, budget=10).tolist() == [1, 2, 3, 4]
    # late: the last half of the rounds share the budget
    assert gossip_schedule("late", 4, budget=4).tolist() == [0, 0, 2, 2]
    assert gossip_schedule("late", 10, budget=3, late_fraction=0.3).tolist() == \
        [0] * 7 + [1, 1, 1]
    for kind in ("uniform", "increasing", "late"):
        assert gossip_schedule(kind, 7, budget=11).sum() == 11


def test_schedule_settings_a_run_does_not_use_are_refused():
    with pytest.raises(ConfigError, match="gossip.schedule.budget: a constant"):
        gossip_schedule("constant", 3, budget=4)
    with pytest.raises(ConfigError, match="needs the total"):
        gossip_schedule("late", 3)
    with pytest.raises(ConfigError, match="late_fraction: only with kind late"):
        gossip_schedule("uniform", 3, budget=3, late_fraction=0.5)
    with pytest.raises(ConfigError, match="gossip.steps: with gossip.schedule.kind=late"):
        run_experiment(peers_config(gossip={"steps": 2, "schedule": {"kind": "late",
                                                                      "budget": 3}}),
                       show_progress=False)
    with pytest.raises(ConfigError, match="gossip.schedule"):
        run_experiment(peers_config(gossip={"mode": "async", "schedule": {"kind": "uniform",
                                                                           "budget": 3}}),
                       show_progress=False)


def test_a_uniform_budget_of_one_a_round_is_the_constant_run_and_late_rounds_start_silent(
        tmp_path):
    plain = logged_rounds(tmp_path, peers_config(eval_every=1), "plain")
    uniform = logged_rounds(tmp_path, peers_config(eval_every=1, gossip={
        "schedule": {"kind": "uniform", "budget": 3}}), "uniform")
    assert uniform == plain
    late = logged_rounds(tmp_path, peers_config(eval_every=1, gossip={
        "schedule": {"kind": "late", "budget": 2, "late_fraction": 0.3}}), "late")
    assert [r["gossip_messages"] for r in late] == [0, 0, 2 * 2 * PEERS]  # ring: 2 a peer
    assert late[0]["consensus_distance"] > plain[0]["consensus_distance"]
