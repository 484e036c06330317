"""Known values for FedAvg, and one contract checker run over every registered stage."""

import pytest
import torch

from engine.contracts import complete_stage, sample_validation
from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.aggregation import fedavg, server_sgd, weighted_mean
from policies.base import Aggregator, chain
from policies.registry import AGGREGATION, build_aggregator, stage_specs


def updates(deltas, weights, ids=None):
    """Updates with every per-client column a pool sends (steps, label counts, Fisher) filled
    with values derived from the deltas, so weightings have all they read."""
    deltas = torch.tensor(deltas, dtype=torch.float32)
    k = deltas.shape[0]
    ids = torch.arange(k) if ids is None else torch.tensor(ids)
    n = torch.tensor(weights, dtype=torch.int64)
    labels = torch.stack([n, (ids * 7) % 5 + 1], dim=1)
    return Updates(deltas, torch.tensor(weights, dtype=torch.float32), ids,
                   deltas.abs().mean(dim=1) if k else torch.zeros(0), n, steps=n // 4 + 1,
                   label_counts=labels, fisher=deltas.square() + 0.01)


def test_fedavg_known_values():
    # (10*[1,2] + 30*[3,-2]) / 40 = [2.5, -1.0]; server lr 0.5 halves it.
    u = updates([[1.0, 2.0], [3.0, -2.0]], [10, 30])
    step, _ = fedavg().update(u, fedavg().init(torch.zeros(2)))
    assert torch.allclose(step, torch.tensor([2.5, -1.0]))
    agg = fedavg(server_lr=0.5)
    assert torch.allclose(agg.update(u, agg.init(torch.zeros(2)))[0], torch.tensor([1.25, -0.5]))


def test_fedavg_is_the_chain_of_its_parts():
    u = updates(torch.randn(6, 5).tolist(), [1, 2, 3, 4, 5, 6])
    a = fedavg(server_lr=0.3)
    b = chain(weighted_mean(), server_sgd(lr=0.3))
    assert torch.equal(a.update(u, a.init(torch.zeros(5)))[0],
                       b.update(u, b.init(torch.zeros(5)))[0])


def test_zero_total_weight_gives_zero_step():
    step, _ = weighted_mean().update(updates([[1.0, 1.0]], [0]), ())
    assert torch.equal(step, torch.zeros(2))


def complete(name: str) -> Aggregator:
    """Any registered stage as a full aggregator (Updates -> step) with default parameters."""
    return complete_stage(AGGREGATION[name], AGGREGATION.make(
        name, "aggregation[0]", {"num_clients": POPULATION, "seed": 3,
                                 "validation": sample_validation}))


POPULATION = 16  # more than the sample's client ids 0..6


NAMES = AGGREGATION.names()


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(0)
    return updates(torch.randn(7, 11, generator=g).tolist(),
                   torch.randint(1, 50, (7,), generator=g).tolist())


def test_every_registered_stage_declares_its_kind():
    for factory in map(AGGREGATION.__getitem__, AGGREGATION.names()):
        assert factory.stage_kind in {"transform", "reduction", "optimizer", "aggregator"}
        assert factory.__doc__ and "20" in factory.__doc__  # cites a paper with its year


@pytest.mark.parametrize("specs, message", [
    (["server_sgd"], "exactly one reduction"),
    (["server_sgd", "weighted_mean"], "exactly one reduction"),
    (["nope"], "unknown stage 'nope'"),
    ([{"fedavg": {"lr": 1}}], r"aggregation\[0\].fedavg.lr: stage 'fedavg' takes no"),
    ([{"fedavg": {"server_lr": -1}}], "greater than 0"),
    (["os:path"], "not marked with policies.base.stage"),
    (["nomodule.x:y"], "cannot import"),
])
def test_bad_chains_are_config_errors(specs, message):
    with pytest.raises(ConfigError, match=message):
        build_aggregator(stage_specs(specs))


def test_out_of_tree_stage_by_path():
    agg = build_aggregator(stage_specs(["policies.aggregation:weighted_mean",
                            {"server_sgd": {"lr": 2.0}}]))
    step, _ = agg.update(updates([[1.0], [3.0]], [1, 1]), agg.init(torch.zeros(1)))
    assert torch.allclose(step, torch.tensor([4.0]))


@pytest.mark.parametrize("name", [n for n in NAMES if AGGREGATION[n].decomposable])
def test_contract_pre_reduced_equals_full_stack(name, sample):
    """Decomposable stages give the same bits from pools' partial sums as from all deltas."""
    from engine.core import tree
    from engine.core.tree import TreeSums

    agg = complete(name)
    full, _ = agg.update(sample, agg.init(torch.zeros(11)))
    leaves = TreeSums.leaves(sample.weights[:, None] * sample.deltas, sample.client_ids)
    parts = [tree.merge(TreeSums(*(c[lo:hi] for c in leaves)), lo, hi)
             for lo, hi in [(0, 2), (2, 3), (3, 7)]]
    pre = sample._replace(deltas=None, weighted_sums=TreeSums.concat(parts))
    assert torch.equal(agg.update(pre, agg.init(torch.zeros(11)))[0], full)


@pytest.mark.parametrize("name", NAMES)
def test_contract_chunked_ray_tasks_equal_single_process(name, sample, ray_cluster):
    """Chunks of the [K, P] stack sent to parallel Ray tasks give the in-process bits."""
    from engine.backends.runtime import RayChunkMap
    from engine.core import parallel

    agg = complete(name)
    with parallel.chunk_map(parallel.serial_map, chunk_columns=3):
        local, _ = agg.update(sample, agg.init(torch.zeros(11)))
    with parallel.chunk_map(RayChunkMap(workers=2, min_elements=0), chunk_columns=3):
        remote, _ = agg.update(sample, agg.init(torch.zeros(11)))
    assert torch.equal(remote, local)
