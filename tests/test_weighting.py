"""Weightings (uniform, samples, FedDisco, MWA) and Fisher merging: known values, the clients'
diagonal Fisher against a plain-autograd computation, and whole runs."""

import math

import numpy as np
import pytest
import torch
from scipy.special import kl_div
from torch import nn

from engine.backends.runtime import RuntimeOptions
from engine.compute.pool import ClientPool, PoolSpec
from engine.compute.training import EXECUTORS, DiagonalFisher, LocalSGD, pin_torch_arithmetic
from engine.core.params import ParamSpec
from engine.core.updates import Updates
from engine.experiment import run_experiment
from policies.aggregation import weighted_mean
from policies.base import chain
from policies.weighting import feddisco, fisher_merge, label_discrepancy, mwa, uniform_weights
from tests.conftest import small_config


def updates(deltas, num_samples, **columns):
    deltas = torch.tensor(deltas, dtype=torch.float64).float()
    k = deltas.shape[0]
    n = torch.tensor(num_samples, dtype=torch.int64)
    cols = {name: None if v is None else torch.tensor(v) for name, v in columns.items()}
    losses = cols.pop("losses", torch.ones(k))
    return Updates(deltas, n.float(), torch.arange(k), losses.float(), n, **cols)


def weights_of(stage, u):
    return stage.update(u, stage.init(torch.zeros(1)))[0].weights.double()


COUNTS = [[8, 0], [4, 4], [2, 6]]  # label distributions [1, 0], [.5, .5], [.25, .75]


def test_feddisco_known_values():
    # KL to uniform: log 2, 0, .25 log .5 + .75 log 1.5; divided by their sum.
    kl = torch.tensor([math.log(2), 0.0, 0.25 * math.log(0.5) + 0.75 * math.log(1.5)],
                      dtype=torch.float64)
    assert torch.allclose(label_discrepancy(torch.tensor(COUNTS)), kl)
    d = kl / kl.sum()
    raw = torch.relu(torch.tensor([1 / 3] * 3, dtype=torch.float64) - 0.5 * d + 0.1)
    u = updates([[0.0]] * 3, [8, 8, 8], label_counts=COUNTS)
    w = weights_of(feddisco(), u)
    assert torch.allclose(w, raw / raw.sum()) and torch.allclose(w.sum(), torch.tensor(1.0,
                                                                                 dtype=w.dtype))
    assert w[1] > w[2] > w[0]  # the balanced client counts most


def test_feddisco_matches_scipy_kl_and_shares():
    """Independent: scipy's elementwise kl_div (as the authors' code uses) and sample shares."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(6, 4))
    n = rng.integers(5, 50, size=6)
    d = np.array([kl_div(c / c.sum(), np.full(4, 0.25)).sum() for c in counts])
    p = np.maximum(n / n.sum() - 0.3 * d / d.sum() + 0.05, 0)
    w = weights_of(feddisco(a=0.3, b=0.05), updates([[0.0]] * 6, n.tolist(),
                                                    label_counts=counts.tolist()))
    np.testing.assert_allclose(w.numpy(), p / p.sum(), rtol=1e-6)


def test_feddisco_relu_and_fallback():
    u = updates([[0.0]] * 3, [8, 8, 8], label_counts=COUNTS)
    assert weights_of(feddisco(a=2.0, b=0.0), u)[0] == 0  # the skewed client is cut off
    # a large penalty and no offset zero everyone: back to sample shares
    assert torch.allclose(weights_of(feddisco(a=100.0, b=-1.0), u),
                          torch.full((3,), 1 / 3, dtype=torch.float64))
    l1 = label_discrepancy(torch.tensor(COUNTS), "l1")
    assert torch.allclose(l1, torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="label_counts"):
        weights_of(feddisco(), updates([[0.0]], [1]))


def test_mwa_known_values():
    u = updates([[0.0]] * 3, [1, 1, 1], losses=[1.0, 2.0, 4.0], steps=[4, 4, 4])
    assert torch.allclose(weights_of(mwa(penalty=1.0), u),
                          torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))
    assert torch.allclose(weights_of(mwa(penalty=0.0), u),
                          torch.full((3,), 1 / 3, dtype=torch.float64))  # p = 0: uniform
    s = updates([[0.0]] * 3, [1, 1, 1], steps=[2, 4, 0])
    assert torch.allclose(weights_of(mwa(metric="steps", penalty=1.0), s),
                          torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    # p = 1/2 by hand: (1/1)^.5 = 1, (1/4)^.5 = 1/2, (1/16)^.5 = 1/4 -> [4, 2, 1] / 7
    h = updates([[0.0]] * 3, [1, 1, 1], losses=[1.0, 4.0, 16.0], steps=[1, 1, 1])
    assert torch.allclose(weights_of(mwa(penalty=0.5), h),
                          torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))
    # steps with p = 2: [1, 4, 9] / 14
    q = updates([[0.0]] * 3, [1, 1, 1], steps=[1, 2, 3])
    assert torch.allclose(weights_of(mwa(metric="steps", penalty=2.0), q),
                          torch.tensor([1 / 14, 4 / 14, 9 / 14], dtype=torch.float64))
    # a client that took no step counts 0 whatever its (zero) loss
    z = updates([[0.0]] * 2, [1, 1], losses=[0.0, 1.0], steps=[0, 3])
    assert torch.equal(weights_of(mwa(), z), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_uniform_weights_average_equally():
    u = updates([[1.0], [3.0]], [1, 9])
    agg = chain(uniform_weights(), weighted_mean())
    assert torch.allclose(agg.update(u, agg.init(torch.zeros(1)))[0], torch.tensor([2.0]))


def merge(u, **kwargs):
    agg = fisher_merge(**kwargs)
    return agg.update(u, agg.init(torch.zeros(2)))[0]


def test_fisher_merge_known_values():
    u = updates([[1.0, 0.0], [3.0, 2.0]], [1, 1], fisher=[[1.0, 0.0], [3.0, 1e-9]])
    # coordinate 0: (1*1 + 3*3) / (1 + 3); coordinate 1: both floored at 1e-6 -> mean of 0, 2
    assert torch.allclose(merge(u, normalize=False), torch.tensor([2.5, 1.0]))
    # normalised, c = 1 / ||F_k|| = [1, ~1/3]: (1*1*1 + 1/3*3*3) / (1*1 + 1/3*3) = 2, and
    # (1*0 + 1/3*2) / (1 + 1/3) = 0.5 where both Fishers are floored
    assert torch.allclose(merge(u), torch.tensor([2.0, 0.5]), atol=1e-6)


def test_fisher_merge_with_equal_fishers_is_weighted_mean():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(5, 2, generator=g)
    u = updates(deltas.tolist(), [3, 1, 4, 1, 5], fisher=torch.ones(5, 2).tolist())
    mean = weighted_mean().update(u, ())[0]
    assert torch.allclose(merge(u, normalize=False), mean, atol=1e-6)
    assert torch.allclose(merge(u), mean, atol=1e-6)  # equal norms: normalising changes nothing


def _reference_fisher(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Plain autograd, one example and one class at a time."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for xi in x:
        log_p = torch.log_softmax(model(xi[None]), dim=-1)[0]
        for y in range(log_p.numel()):
            grads = torch.autograd.grad(log_p[y], list(model.parameters()), retain_graph=True)
            for t, gr in zip(total, grads, strict=True):
                t += log_p[y].exp().detach() * gr**2
    return torch.cat([t.flatten() for t in total]) / x.shape[0]


def test_diagonal_fisher_matches_plain_autograd():
    pin_torch_arithmetic()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    spec = ParamSpec.of(model)
    x = torch.randn(10, 5)
    w = torch.stack([nn.utils.parameters_to_vector(model.parameters()).detach(),
                     torch.randn(spec.size) * 0.3])
    fisher = DiagonalFisher(model, spec, block=4)(w, x, np.array([0, 6]), np.array([6, 4]))
    assert torch.allclose(fisher[0], _reference_fisher(model, x[:6]), atol=1e-6)
    nn.utils.vector_to_parameters(w[1], model.parameters())
    assert torch.allclose(fisher[1], _reference_fisher(model, x[6:]), atol=1e-6)


def test_pools_send_label_counts_steps_and_fisher(small_task):
    task, model = small_task
    shard = task.shard(0, 6)
    hp = LocalSGD(epochs=1, batch_size=8, lr=0.1)
    spec = PoolSpec(model, hp, EXECUTORS["vmap"], 0, fisher=True, label_counts=True)
    ids, params = np.array([1, 4]), torch.zeros(ParamSpec.of(model.build()).size)
    res = ClientPool(spec, shard).train(params, ids, round_idx=0)
    plain = ClientPool(PoolSpec(model, hp, EXECUTORS["vmap"], 0), shard).train(params, ids, 0)
    assert plain.updates.label_counts is None and plain.updates.fisher is None  # not asked
    _, y, _ = task.train_rows()
    for row, c in enumerate(ids):
        labels = y[task.store.offsets[c]: task.store.offsets[c + 1]]
        expected = np.bincount(labels, minlength=model.num_classes)
        assert res.updates.label_counts[row].tolist() == expected.tolist()
        assert int(res.updates.steps[row]) == -(-labels.size // 8)
    assert res.updates.fisher.shape == res.updates.deltas.shape
    assert bool((res.updates.fisher >= 0).all()) and bool((res.updates.fisher > 0).any())


@pytest.fixture
def small_task():
    from engine.resolve import build_task

    task = build_task(small_config(seed=0))
    return task, task.model


@pytest.mark.parametrize("chain_", ["fisher_merge", ["feddisco", "fedavg"],
                                    [{"mwa": {"penalty": 0.7}}, "fedavg"]])
def test_weighted_runs_are_layout_independent(tmp_path, ray_cluster, chain_):
    cfg = small_config(rounds=3, aggregation=chain_)
    runs = [run_experiment(cfg, options, tmp_path, False).loop for options in
            (RuntimeOptions("inline"), RuntimeOptions("ray", pools=2, reuse_actors=True))]
    assert torch.equal(runs[0].params, runs[1].params)
    assert runs[0].final_accuracy > 0.5
