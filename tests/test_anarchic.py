"""AFA-CD and AFA-CS (Anarchic Federated Learning): known values by hand, AFA-CS's memory
across rounds, and a plain local-SGD check that delta / K is -eta_L times the mean gradient."""

import pytest
import torch

from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.anarchic import afa_cd, afa_cs
from policies.registry import build_aggregator, stage_specs


def updates(deltas, ids, steps, samples=None):
    k = len(ids)
    n = torch.tensor(samples or [1] * k, dtype=torch.int64)
    return Updates(torch.tensor(deltas), n.float(), torch.tensor(ids), torch.ones(k), n,
                   steps=torch.tensor(steps))


def test_afa_cd_averages_per_step_updates_with_the_server_rate():
    agg = afa_cd(lr=3.0)
    u = updates([[2.0, 4.0], [3.0, -6.0], [5.0, 5.0]], [0, 4, 7], [2, 3, 0], [10, 1, 1])
    step, _ = agg.update(u, agg.init(torch.zeros(2)))
    # delta / K: [1, 2], [1, -2]; the step-less client weighs 0; uniform mean [1, 0]; x 3
    torch.testing.assert_close(step, torch.tensor([3.0, 0.0]))


def test_afa_cs_steps_with_the_mean_of_every_clients_latest_update():
    agg = build_aggregator(stage_specs({"afa_cs": {"lr": 2.0}}), num_clients=4)
    state = agg.init(torch.zeros(1))
    rounds = [([[4.0]], [1], [2]),            # memory {1: 2}            -> mean 2
              ([[9.0], [6.0]], [0, 2], [3, 1]),  # {0: 3, 1: 2, 2: 6}    -> mean 11/3
              ([[-3.0]], [1], [1])]           # client 1 replaced: {3, -3, 6} -> mean 2
    expected = [2 * 2.0, 2 * 11 / 3, 2 * 2.0]
    for (deltas, ids, steps), want in zip(rounds, expected, strict=True):
        step, state = agg.update(updates(deltas, ids, steps), state)
        torch.testing.assert_close(step, torch.tensor([want]))
    # AFA-CD on the last round alone: -3 * 2
    cd = afa_cd(lr=2.0)
    torch.testing.assert_close(cd.update(updates(*rounds[2]), cd.init(torch.zeros(1)))[0],
                               torch.tensor([-6.0]))


def test_afa_cs_needs_the_population_size():
    with pytest.raises(ConfigError, match="num_clients"):
        afa_cs()


def test_delta_over_steps_is_the_mean_local_gradient_times_the_client_rate():
    # local SGD on f(w) = 0.5 ||w - c||^2 at rate eta_L for K steps, in float64
    c, w0, eta_l, k = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), 0.1, 4
    w, grads = w0.clone(), []
    for _ in range(k):
        grads.append(w - c)
        w = w - eta_l * grads[-1]
    g_avg = torch.stack(grads).mean(dim=0)
    agg = afa_cd(lr=1.5)
    u = Updates((w - w0)[None].float(), torch.ones(1), torch.tensor([0]), torch.ones(1),
                torch.ones(1, dtype=torch.int64), steps=torch.tensor([k]))
    step, _ = agg.update(u, agg.init(torch.zeros(2)))
    torch.testing.assert_close(step, (-1.5 * eta_l * g_avg).float())  # -eta eta_L G
