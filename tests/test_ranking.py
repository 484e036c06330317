"""`analyze --rank KEY --across KEY`: systems ranked in every scenario, then aggregated by Borda
and Kemeny next to the mean score, checked against rankings computed here by hand (sorting,
position sums, brute force over orders) on a real sweep's logs."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import yaml

from engine.analysis.ranking import rank_systems
from engine.analysis.summary import load_runs
from engine.core.errors import ConfigError
from engine.sweeps.scheduler import InlineRunner, run_sweep
from engine.sweeps.sweep import load_sweep
from tests.conftest import ROOT

SYSTEMS = ["coordinate_median", "fedavg", "trimmed_mean"]
ATTACKS = ["none", "sign_flip", "gaussian"]


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A 3 x 3 sweep of the Byzantine config (2 rounds, 1 seed), inline."""
    root = tmp_path_factory.mktemp("rank")
    path = root / "rank.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs" / "byzantine_alie.yaml"), "experiment": "rank",
        "set": {"rounds": 2, "eval_every": 1, "attack.fraction": 0.2},
        "grid": {"aggregation": SYSTEMS, "attack.kind": ATTACKS}}))
    report = run_sweep(load_sweep(path), root / "logs", InlineRunner(1), show_progress=False)
    assert [o.status for o in report.outcomes] == ["completed"] * 9
    return root / "logs" / "rank"


def _by_hand(logs):
    """final_accuracy per (attack, system), and each attack's ranking (0 = best, ties: the
    lower system name)."""
    runs = load_runs(logs)
    config = [(c["aggregation"][0] if isinstance(c["aggregation"][0], str)
               else next(iter(c["aggregation"][0])), c["attack"]["kind"]) for c in runs.configs]
    accuracy = dict(zip(config, runs.summary["final_accuracy"].to_pylist(), strict=True))
    rankings = []
    for attack in sorted(ATTACKS):
        order = sorted(range(3), key=lambda s: (-accuracy[(SYSTEMS[s], attack)], s))
        rankings.append([order.index(s) for s in range(3)])
    return runs, accuracy, np.array(rankings)


def test_rankings_borda_and_kemeny_match_hand_computed_ones(logs):
    runs, accuracy, rankings = _by_hand(logs)
    ranked = rank_systems(runs, "aggregation", "attack.kind")
    assert ranked.systems == SYSTEMS
    assert ranked.scenarios == [f"attack.kind={a}, final_accuracy" for a in sorted(ATTACKS)]
    np.testing.assert_array_equal(ranked.rankings, rankings)
    positions = rankings.sum(axis=0)  # Borda: the lowest total position wins
    borda = sorted(range(3), key=lambda s: (positions[s], s))
    assert ranked.by_borda.tolist() == [borda.index(s) for s in range(3)]

    def cost(order):  # pairs ordered against a scenario's ranking, over all scenarios
        return sum(int(r[order[j]] < r[order[i]]) for r in rankings
                   for i, j in itertools.combinations(range(3), 2))

    best = min(itertools.permutations(range(3)), key=lambda o: (cost(o), o))
    assert ranked.by_kemeny.tolist() == [best.index(s) for s in range(3)]
    scaled = []
    for attack in sorted(ATTACKS):
        v = np.array([accuracy[(s, attack)] for s in SYSTEMS])
        scaled.append((v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else v * 0)
    np.testing.assert_allclose(ranked.mean_scores, np.mean(scaled, axis=0))


def test_analyze_rank_from_the_command_line(logs):
    done = subprocess.run([sys.executable, "run.py", "analyze", str(logs), "--rank",
                           "aggregation", "--across", "attack.kind", "--metric",
                           "final_accuracy,best_accuracy"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:5] == ["aggregation", "mean_score", "mean_rank", "borda_rank",
                                    "kemeny_rank"]
    assert {line.split()[0] for line in lines[1:4]} == set(SYSTEMS)
    assert "(6 rankings:" in done.stdout and "kemeny: total Kendall tau distance" in done.stdout
    bad = subprocess.run([sys.executable, "run.py", "analyze", str(logs), "--rank",
                          "aggregation"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--rank and --across go together" in bad.stderr


def test_a_system_missing_from_a_scenario_is_one_line(logs):
    runs = load_runs(logs)
    with pytest.raises(ConfigError, match="--rank seed: needs at least 2 values"):
        rank_systems(runs, "seed", "attack.kind")
