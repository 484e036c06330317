"""Server merges: Model Stock (per-layer interpolation towards the global model) and model
soups: known values against plain float64 loops and constructed cases."""

import math

import numpy as np
import pytest
import torch

from engine.core.errors import ConfigError
from engine.core.updates import Updates
from engine.experiment import prepare
from policies.merging import greedy_members, greedy_soup, model_stock, uniform_soup
from scenarios.models import ModelSpec, mlp
from tests.conftest import small_config


def updates(deltas, num_samples=None, **columns):
    deltas = torch.tensor(deltas, dtype=torch.float64).float()
    k = deltas.shape[0]
    n = torch.tensor(num_samples or [1] * k, dtype=torch.int64)
    cols = {name: torch.tensor(v) for name, v in columns.items()}
    return Updates(deltas, n.float(), torch.arange(k), torch.ones(k), n, **cols)


def step_of(stage, u):
    return stage.update(u, stage.init(torch.zeros(u.deltas.shape[1])))[0]


def stock_loop(deltas, layers):
    """Model Stock in plain Python floats: per layer, t = k c / (1 + (k-1) c) with c the
    mean pairwise cosine (clamped at 0), step = t * mean."""
    k, out, lo = len(deltas), [], 0
    for size in layers:
        rows = [d[lo:lo + size] for d in deltas]
        cosines = []
        for i in range(k):
            for j in range(i + 1, k):
                dot = sum(a * b for a, b in zip(rows[i], rows[j], strict=True))
                ni = math.sqrt(sum(a * a for a in rows[i]))
                nj = math.sqrt(sum(b * b for b in rows[j]))
                cosines.append(dot / (ni * nj))
        c = max(sum(cosines) / len(cosines), 0.0)
        t = k * c / (1 + (k - 1) * c)
        out += [t * sum(r[n] for r in rows) / k for n in range(size)]
        lo += size
    return out


def test_model_stock_matches_a_float64_loop_per_layer():
    g = torch.Generator().manual_seed(3)
    deltas = (torch.randn(3, 7, generator=g) + 0.8).double().float().tolist()
    deltas[2][5:] = [-x for x in deltas[0][5:]]  # layer 2's deltas disagree: cos < 0, t = 0
    expected = torch.tensor(stock_loop(deltas, (5, 2)), dtype=torch.float32)
    got = step_of(model_stock(layer_sizes=(5, 2)), updates(deltas))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[5:], torch.zeros(2)) and got[:5].abs().sum() > 0
    # one layer over the whole vector is another merge
    whole = step_of(model_stock(), updates(deltas))
    torch.testing.assert_close(whole, torch.tensor(stock_loop(deltas, (7,))), atol=1e-6,
                               rtol=1e-6)


def test_model_stock_known_ratio_for_two_models():
    # K = 2 at 60 degrees: cos = 1/2, t = 2 * 0.5 / 1.5 = 2/3; orthogonal: t = 0
    u = updates([[1.0, 0.0, 2.0, 0.0], [0.5, math.sqrt(3) / 2, 0.0, 3.0]])
    got = step_of(model_stock(layer_sizes=(2, 2)), u)
    expected = [2 / 3 * 0.75, 2 / 3 * math.sqrt(3) / 4, 0.0, 0.0]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    # identical deltas: cos = 1, t = 1 whatever K: the plain average
    same = updates([[1.0, 2.0, 3.0, 4.0]] * 3, [1, 5, 9])
    torch.testing.assert_close(step_of(model_stock(layer_sizes=(2, 2)), same),
                               torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_layer_sizes_are_the_parameter_tensors_in_flat_order():
    spec = ModelSpec(mlp, (4,), 3)
    assert spec.layer_sizes() == (4 * 64, 64, 64 * 3, 3)


def score_by_table(table):
    """A held-out accuracy read off a table keyed by the model's rounded first coordinate."""
    return lambda params: table[round(float(params[0]), 4)]


def test_greedy_soup_keeps_the_known_subset():
    # four client models (first coordinate identifies them and their soups); w0 = 0
    deltas = [[4.0, 1.0], [1.0, 2.0], [2.0, 0.0], [3.0, 5.0]]
    # by accuracy: 1.0 (0.9), 3.0 (0.7), 4.0 (0.6), 2.0 (0.5). Soups: {1,3} mean 2.0 -> 0.5
    # is a drop (rejected); {1,4} mean 2.5 -> 0.95 kept; {1,4,2} mean 7/3 -> 0.95 kept (not
    # a drop); so the soup is clients 1 (1.0), 0 (4.0), 2 (2.0): mean [7/3, 1].
    table = {1.0: 0.9, 2.0: 0.5, 3.0: 0.7, 4.0: 0.6, 2.5: 0.95, round(7 / 3, 4): 0.95}
    u = updates(deltas)
    members = greedy_members(u.deltas, torch.zeros(2), u.client_ids, score_by_table(table))
    assert sorted(members) == [0, 1, 2] and members[0] == 1
    agg = greedy_soup(validation=score_by_table(table))
    step, state = agg.update(u, agg.init(torch.zeros(2)))
    torch.testing.assert_close(step, torch.tensor([7 / 3, 1.0]))
    assert torch.equal(state, step)  # the global model it keeps: w0 + step


def test_uniform_soup_is_the_plain_average():
    agg = uniform_soup()
    step, _ = agg.update(updates([[1.0], [4.0]], [1, 99]), agg.init(torch.zeros(1)))
    torch.testing.assert_close(step, torch.tensor([2.5]))


def test_the_validation_split_is_held_out_of_training_and_refused_unread():
    base = prepare(small_config()).task
    parts = prepare(small_config(aggregation="greedy_soup",
                                 task={"validation_fraction": 0.25}))
    data, trained, before = parts.task.data, parts.task.client_sizes.sum(), base.client_sizes.sum()
    assert trained + len(data.y_val) == before
    assert abs(len(data.y_val) - 0.25 * before) <= 20  # per client, rounded
    base = base.data
    assert np.array_equal(data.y_test, base.y_test)  # the test set does not move
    with pytest.raises(ConfigError, match="task.validation_fraction"):
        prepare(small_config(aggregation="greedy_soup"))
    with pytest.raises(ConfigError, match=r"task.validation_fraction: holds out"):
        prepare(small_config(task={"validation_fraction": 0.25}))
    with pytest.raises(ConfigError, match="last one"):
        prepare(small_config(aggregation=["greedy_soup", "server_sgd"],
                             task={"validation_fraction": 0.25}))
