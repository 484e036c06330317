"""Same config and seed: identical results with 1 pool, 2 pools (Ray) and inline."""

import pyarrow.compute as pc
import pytest
import torch

from engine.backends.runtime import RuntimeOptions
from engine.experiment import run_experiment
from engine.records.logs import read_table
from tests.conftest import small_config

METRICS = ["round", "num_updates", "train_loss", "test_loss", "test_accuracy",
           "mean_update_norm"]


def _run(tmp_path, name, options):
    cfg = small_config(experiment=name, rounds=4)
    result = run_experiment(cfg, options, tmp_path, False)
    rounds = read_table(tmp_path / name, "rounds").sort_by("round")
    clients = read_table(tmp_path / name, "clients").sort_by([("round", "ascending"),
                                                             ("client_id", "ascending")])
    return (result, rounds.select(METRICS),
            clients.select(["client_id", "train_loss", "update_norm"]),
            clients["pool"].to_pylist())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_cluster):
    tmp = tmp_path_factory.mktemp("det")
    return {
        "inline": _run(tmp, "inline", RuntimeOptions("inline")),
        "ray1": _run(tmp, "ray1", RuntimeOptions("ray", pools=1, reuse_actors=True)),
        "ray2": _run(tmp, "ray2", RuntimeOptions("ray", pools=2, reuse_actors=True)),
        "inline3": _run(tmp, "inline3", RuntimeOptions("inline", pools=3)),
    }


@pytest.mark.parametrize("other", ["ray1", "ray2", "inline3"])
def test_identical_metrics_and_models(runs, other):
    base, rounds, clients, _ = runs["inline"]
    result, other_rounds, other_clients, _ = runs[other]
    assert torch.equal(base.loop.params, result.loop.params)
    assert rounds.equals(other_rounds)
    assert clients.equals(other_clients)


def test_the_layouts_really_differ(runs):
    """Guard against comparing a layout with itself: clients sat in different pools."""
    assert set(runs["inline"][3]) == {0}
    assert set(runs["ray2"][3]) == {0, 1}
    assert set(runs["inline3"][3]) == {0, 1, 2}


@pytest.mark.parametrize("server", [{"mode": "sync"},
                                    {"mode": "fedbuff", "buffer": 2, "concurrency": 3}])
def test_scaffold_is_layout_independent(tmp_path, ray_cluster, server):
    """Client control variates live in the pools; the server's is summed on the id tree
    (synchronous), or moved by each aggregated client's delta c_i (asynchronous)."""
    cfg = small_config(rounds=3, training={"scaffold": True}, server=server)
    params = [run_experiment(cfg, options, tmp_path, False).loop.params for options in
              (RuntimeOptions("inline"), RuntimeOptions("inline", pools=3),
               RuntimeOptions("ray", pools=2, reuse_actors=True))]
    assert torch.equal(params[0], params[1]) and torch.equal(params[0], params[2])
    plain = run_experiment(small_config(rounds=3, server=server), RuntimeOptions("inline"),
                           tmp_path, False)
    assert not torch.equal(plain.loop.params, params[0])


@pytest.mark.parametrize("model", ["logistic", "mlp", "cnn"])
@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_every_model_is_layout_independent(tmp_path, model, executor):
    """1 pool, 3 pools and 20 pools (one client each, most idle in a round): same bits."""
    cfg = small_config(rounds=2, task={"model": {"kind": model, "mlp": {"hidden": [16]}}},
                       training={"executor": executor, "batch_size": 100})
    params = [run_experiment(cfg, RuntimeOptions("inline", pools=n), tmp_path, False).loop.params
              for n in (1, 3, 20)]
    assert all(torch.equal(params[0], p) for p in params[1:])


def test_synthetic_task_is_layout_independent(tmp_path):
    cfg = small_config(rounds=2, task={"dataset": "synthetic",
                                       "synthetic": {"samples_per_client": 30,
                                                     "quantity_sigma": 1.0}},
                       partition={"kind": "natural"})
    a, b = (run_experiment(cfg, RuntimeOptions("inline", pools=n), tmp_path, False).loop.params
            for n in (1, 4))
    assert torch.equal(a, b)


def test_a_different_seed_differs(tmp_path):
    a = run_experiment(small_config(rounds=1), RuntimeOptions("inline"), tmp_path, False)
    b = run_experiment(small_config(rounds=1, seed=8), RuntimeOptions("inline"), tmp_path, False)
    assert not torch.equal(a.loop.params, b.loop.params)
    rounds = read_table(tmp_path / "test", "rounds")
    assert pc.count_distinct(rounds["run_id"]).as_py() == 2


@pytest.mark.parametrize("attack, aggregation", [
    ({"kind": "alie", "fraction": 0.25}, [{"bulyan": {"f": 1}}]),
    ({"kind": "gaussian", "fraction": 0.25}, ["nnm", "geometric_median", "server_adam"]),
])
def test_attacks_and_holistic_rules_do_not_depend_on_layout(tmp_path, ray_cluster, attack,
                                                             aggregation):
    """Attacks see id-ordered updates and seeded draws; holistic rules get the full stack."""
    models = []
    for options in [RuntimeOptions("inline"), RuntimeOptions("ray", pools=2, reuse_actors=True),
                    RuntimeOptions("inline", pools=3)]:
        cfg = small_config(rounds=3, attack=attack, aggregation=aggregation,
                           population={"participation": {"clients_per_round": 8}})
        models.append(run_experiment(cfg, options, tmp_path, False).loop.params)
    assert all(torch.equal(models[0], m) for m in models[1:])
