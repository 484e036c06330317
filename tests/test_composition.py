"""Protocols compose with world models, attacks and policies: the combinations issue 14 asks
for, each run as a user would (a shipped config and overrides, a few rounds), inline and on
Ray with 2 pools, with the same results."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from engine.backends.runtime import RuntimeOptions
from engine.experiment import run_experiment
from engine.records.logs import read_table
from engine.resolve import load as load_config
from tests.conftest import ROOT

COMBINATIONS = {
    "fedbuff+trimmed_mean": ("fedbuff_async", ["aggregation=trimmed_mean"]),
    "fedbuff+sign_flip+median": ("fedbuff_async", [
        "attack.kind=sign_flip", "attack.fraction=0.2", "aggregation=coordinate_median"]),
    "fedbuff+fedadam": ("fedbuff_async", ["aggregation=fedadam"]),
    "fedasync+scaffold": ("fedbuff_async", ["server.mode=fedasync", "training.scaffold=true"]),
    "fedbuff+feddisco": ("fedbuff_async", ["aggregation=[feddisco, fedavg]"]),
    "fedbuff+fisher_merge": ("fedbuff_async", ["aggregation=fisher_merge"]),
    "fedbuff+power_of_choice": ("fedbuff_async", ["selection.kind=power_of_choice"]),
    "async_gossip+clipped+dissensus": ("gossip_async", [
        "consensus=clipped_gossip", "attack.kind=dissensus", "attack.fraction=0.1"]),
    "async_gossip+crash+loss": ("gossip_async", [
        "failures.crash.rate=0.1", "failures.message_loss=0.05"]),
    "modest+crash": ("gossip_ring", ["consensus=modest", "failures.crash.rate=0.2"]),
    "gossip+bernoulli+topk": ("gossip_ring", [
        "population.availability.kind=bernoulli", "training.compression.kind=topk"]),
    "gossip+devices": ("gossip_ring", ["devices.latency_s.value=0.2",
                                       "devices.up_bps.value=100000"]),
    "async_gossip+monna+momentum": ("gossip_async", ["consensus=monna",
                                                     "training.momentum=0.9"]),
    "gossip+lognormal_devices": ("gossip_ring", [
        "devices.step_s.kind=lognormal", "devices.step_s.median=0.05",
        "devices.step_s.sigma=1.5"]),
    "async_gossip+lognormal_devices": ("gossip_async", [
        "devices.step_s.kind=lognormal", "devices.step_s.median=0.05",
        "devices.step_s.sigma=1.5"]),
}
# where the setting changes only the clock (a synchronous round waits for its slowest peer)
SAME_MODEL = {"gossip+devices", "gossip+lognormal_devices"}
SHORT = ["rounds=4", "eval_every=2"]
COLUMNS = ["round", "num_updates", "test_accuracy", "consensus_distance", "virtual_time",
           "gossip_messages", "bytes_communicated"]


def _run(name: str, options: RuntimeOptions, root):
    config, overrides = COMBINATIONS[name]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [*overrides, *SHORT])
    result = run_experiment(cfg, options, root, False)
    rounds = read_table(result.log_dir, "rounds").sort_by("round")
    return result, rounds.select([c for c in COLUMNS if c in rounds.column_names])


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_combination_runs_and_matches_on_ray(name, tmp_path, ray_cluster):
    inline, rows = _run(name, RuntimeOptions("inline", 1), tmp_path / "inline")
    ray, ray_rows = _run(name, RuntimeOptions("ray", 2, reuse_actors=True), tmp_path / "ray")
    assert inline.loop.rounds_done == 4 and math.isfinite(inline.loop.final_accuracy)
    assert np.isfinite(inline.loop.params.numpy()).all()
    assert rows.equals(ray_rows), name
    np.testing.assert_array_equal(inline.loop.params.numpy(), ray.loop.params.numpy())
    vtime = rows["virtual_time"].to_pylist()
    assert all(v is not None and v > 0 for v in vtime)  # every protocol keeps a clock


@pytest.mark.parametrize("config", sorted({c for c, _ in COMBINATIONS.values()}))
def test_each_setting_changes_what_it_should_against_the_plain_run(config, tmp_path):
    """Against the shipped config as it stands: every combination's model differs, except
    where the setting only moves the clock (devices under synchronous gossip), and there the
    virtual time does."""
    def run(overrides, name):
        cfg = load_config(ROOT / "configs" / f"{config}.yaml", [*overrides, *SHORT])
        result = run_experiment(cfg, RuntimeOptions("inline", 1), tmp_path / name, False)
        vtime = read_table(result.log_dir, "rounds")["virtual_time"].to_pylist()
        return result.loop.params.numpy(), max(vtime)

    plain, plain_time = run([], "plain")
    for name, (base, overrides) in COMBINATIONS.items():
        if base != config:
            continue
        params, vtime = run(overrides, name)
        if name in SAME_MODEL:
            np.testing.assert_array_equal(params, plain)
            assert vtime != plain_time, name
        else:
            assert not np.array_equal(params, plain), name


def test_power_of_choice_dispatches_other_clients_than_uniform_under_fedbuff(tmp_path):
    """Asynchronous dispatch picks among the idle clients with the selection policy: by their
    last reported loss under power-of-choice, so other clients train than under uniform."""
    clients = {}
    for kind in ("uniform", "power_of_choice"):
        cfg = load_config(ROOT / "configs" / "fedbuff_async.yaml",
                          [f"selection.kind={kind}", *SHORT])
        result = run_experiment(cfg, RuntimeOptions("inline", 1), tmp_path / kind, False)
        table = read_table(result.log_dir, "clients").sort_by([("round", "ascending"),
                                                              ("client_id", "ascending")])
        clients[kind] = table.select(["round", "client_id"]).to_pylist()
    assert clients["uniform"] != clients["power_of_choice"]


def test_gossip_devices_set_the_round_length(tmp_path):
    """A synchronous gossip round lasts as long as its slowest peer: latency + steps +
    its messages in and out. Slower uplinks make every round longer."""
    fast = _run("gossip+devices", RuntimeOptions("inline", 1), tmp_path / "a")[1]
    cfg = load_config(ROOT / "configs" / "gossip_ring.yaml",
                      ["devices.latency_s.value=0.2", "devices.up_bps.value=10000", *SHORT])
    slow = read_table(run_experiment(cfg, RuntimeOptions("inline", 1), tmp_path / "b",
                                     False).log_dir, "rounds").sort_by("round")
    a, b = (np.diff([0.0, *t["virtual_time"].to_pylist()]) for t in (fast, slow))
    assert np.all(b > a)
    assert np.all(a > 0.2)  # at least the latency


def test_a_composed_protocol_from_the_command_line(tmp_path):
    """As the README's composing section shows it: FedBuff's buffer through trimmed mean,
    under sign flip, on Ray."""
    out = subprocess.run(
        [sys.executable, "run.py", "configs/fedbuff_async.yaml", "aggregation=trimmed_mean",
         "attack.kind=sign_flip", "attack.fraction=0.2", "rounds=3", "--log-dir",
         str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "test accuracy: final" in out.stdout
    clients = read_table(tmp_path / "fedbuff_async", "clients")
    assert any(clients["byzantine"].to_pylist())


def test_over_selected_peers_sit_the_round_out(tmp_path):
    """K = 4 of 32 peers train, 6 are picked: the 2 slowest are over-selected, as clients
    are, and neither train nor gossip that round."""
    cfg = load_config(ROOT / "configs" / "gossip_ring.yaml", [
        "population.participation={clients_per_round: 4}", "selection.kind=over_selection",
        "selection.factor=1.5", "devices.step_s={kind: lognormal, median: 0.01, sigma: 1}",
        *SHORT])
    result = run_experiment(cfg, RuntimeOptions("inline", 1), tmp_path, False)
    rounds = read_table(result.log_dir, "rounds")
    assert rounds["num_updates"].to_pylist() == [4] * 4
    events = read_table(result.log_dir, "events")["kind"].to_pylist()
    assert events.count("over_selected") == 2 * 4


def test_peers_that_drop_out_skip_training_or_gossip(tmp_path):
    cfg = load_config(ROOT / "configs" / "gossip_ring.yaml", [
        "failures.dropout_before=0.25", "failures.dropout_after=0.25", *SHORT])
    result = run_experiment(cfg, RuntimeOptions("inline", 1), tmp_path, False)
    events = read_table(result.log_dir, "events").to_pylist()
    before = [e for e in events if e["kind"] == "dropped_before"]
    after = [e for e in events if e["kind"] == "dropped_after"]
    assert before and after
    rounds = read_table(result.log_dir, "rounds").sort_by("round").to_pylist()
    for row in rounds:  # who dropped before training did not train
        gone = sum(e["round"] == row["round"] for e in before)
        assert row["num_updates"] == 32 - gone
