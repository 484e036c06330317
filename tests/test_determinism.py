"""Same config and seed: identical results with 1 pool, 2 pools (Ray) and inline."""

import pyarrow.compute as pc
import pytest
import torch

from engine.experiment import run_experiment
from engine.logs import read_table
from engine.runtime import RuntimeOptions
from tests.conftest import small_config

METRICS = ["round", "num_updates", "train_loss", "test_loss", "test_accuracy",
           "mean_update_norm"]


def _run(tmp_path, name, options):
    cfg = small_config(experiment=name, rounds=4)
    result = run_experiment(cfg, options, tmp_path, False)
    rounds = read_table(tmp_path / name, "rounds").sort_by("round")
    clients = read_table(tmp_path / name, "clients").sort_by([("round", "ascending"),
                                                             ("client_id", "ascending")])
    return result, rounds.select(METRICS), clients.select(["client_id", "train_loss",
                                                           "update_norm"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("det")
    return {
        "inline": _run(tmp, "inline", RuntimeOptions("inline")),
        "ray1": _run(tmp, "ray1", RuntimeOptions("ray", pools=1)),
        "ray2": _run(tmp, "ray2", RuntimeOptions("ray", pools=2)),
        "inline3": _run(tmp, "inline3", RuntimeOptions("inline", pools=3)),
    }


@pytest.mark.parametrize("other", ["ray1", "ray2", "inline3"])
def test_identical_metrics_and_models(runs, other):
    base, rounds, clients = runs["inline"]
    result, other_rounds, other_clients = runs[other]
    assert torch.equal(base.loop.params, result.loop.params)
    assert rounds.equals(other_rounds)
    assert clients.equals(other_clients)


def test_pool_layout_is_what_differs(runs):
    assert runs["ray2"][0].loop.client_updates == 4 * 5
    assert runs["inline"][1].num_rows == 4


def test_a_different_seed_differs(tmp_path):
    a = run_experiment(small_config(rounds=1), RuntimeOptions("inline"), tmp_path, False)
    b = run_experiment(small_config(rounds=1, seed=8), RuntimeOptions("inline"), tmp_path, False)
    assert not torch.equal(a.loop.params, b.loop.params)
    rounds = read_table(tmp_path / "test", "rounds")
    assert pc.count_distinct(rounds["run_id"]).as_py() == 2
