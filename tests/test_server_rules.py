"""The asynchronous server rules (policies/asynchronous.py) against values worked by hand:
when each rule aggregates, and the model it makes through the default chain (fedavg) and
through other reductions."""

from __future__ import annotations

import pytest
import torch

from engine.core.plans import Dispatch
from policies.asynchronous import SERVER_RULES, fedasync, fedbuff, fedfix
from policies.registry import build_aggregator, stage_specs
from policies.staleness import STALENESS


def arrival(seq: int, client: int, version: int, delta: list[float], samples: int = 10
            ) -> Dispatch:
    return Dispatch(seq, client, version, 0.0, 1.0, 4, "completed", torch.tensor(delta), 0.5,
                    samples)


def new_model(rule, batch, version, model_at, chain="fedavg", total=100.0) -> torch.Tensor:
    """model + scale * chain(updates): what the asynchronous loop makes of a batch."""
    updates, scale = rule.updates(tuple(batch), version, model_at, total)
    agg = build_aggregator(stage_specs(chain))
    step, _ = agg.update(updates, agg.init(torch.zeros(2)))
    return model_at(version) + scale * step


def test_fedasync_mixes_every_arrival_with_alpha_times_staleness():
    """x <- (1 - a s(tau)) x + a s(tau) x_i: alpha 0.5, s(tau) = 1 / (1 + tau) (polynomial,
    a = 1), tau = 2. The server is at version 2 with x = [1, 2]; the update was trained from
    version 0's x0 = [0, 0] with delta [4, 2], so x_i = [4, 2]; a = 0.5 / 3 = 1/6:
    x = 5/6 [1, 2] + 1/6 [4, 2] = [1.5, 2]."""
    rule = fedasync(alpha=0.5, staleness=STALENESS.make("polynomial", a=1.0))
    models = {0: torch.zeros(2), 2: torch.tensor([1.0, 2.0])}
    d = arrival(7, 3, 0, [4.0, 2.0])
    decision = rule.arrive(rule.init(), d, 1.0)
    assert decision.aggregate == (d,)  # every arrival
    torch.testing.assert_close(new_model(rule, [d], 2, models.__getitem__),
                               torch.tensor([1.5, 2.0]))


def test_fedbuff_steps_every_k_arrivals_with_the_mean_of_scaled_deltas():
    """x <- x + lr (1/K) sum_i s(tau_i) delta_i: K = 2, lr = 2, s(tau) = 1 / sqrt(1 + tau).
    At version 3 with x = [1, 1]: delta [2, 0] from version 3 (s = 1) and [0, 6] from version
    0 (s = 1/2): x + 2 * ([2, 0] + [0, 3]) / 2 = [3, 4]. The first arrival waits."""
    rule = fedbuff(buffer=2, lr=2.0, staleness=STALENESS.make("sqrt"))
    a, b = arrival(1, 5, 3, [2.0, 0.0]), arrival(2, 6, 0, [0.0, 6.0])
    first = rule.arrive(rule.init(), a, 1.0)
    assert first.aggregate == () and first.state == (a,)
    second = rule.arrive(first.state, b, 2.0)
    assert second.aggregate == (a, b) and second.state == ()
    x = {3: torch.ones(2)}.__getitem__
    torch.testing.assert_close(new_model(rule, second.aggregate, 3, x), torch.tensor([3.0, 4.0]))
    updates, _ = rule.updates(second.aggregate, 3, x, 100.0)
    assert updates.staleness.tolist() == [0, 3] and updates.weights.tolist() == [1.0, 1.0]


def test_fedbuff_buffer_through_another_reduction():
    """The buffer goes through any chain: the coordinate median of s(tau_i) delta_i (s = 1)
    over [1, 9], [2, 0], [7, 4] is [2, 4]."""
    rule = fedbuff(buffer=3)
    batch = [arrival(i, i, 0, delta) for i, delta in enumerate([[1.0, 9.0], [2.0, 0.0],
                                                                 [7.0, 4.0]])]
    x = {0: torch.zeros(2)}.__getitem__
    torch.testing.assert_close(new_model(rule, batch, 0, x, chain="coordinate_median"),
                               torch.tensor([2.0, 4.0]))


def test_a_client_back_twice_in_one_buffer_counts_twice():
    """Rows are keyed by dispatch number: the same client's two updates are two rows."""
    rule = fedbuff(buffer=2)
    batch = [arrival(4, 9, 0, [2.0, 0.0]), arrival(8, 9, 1, [0.0, 2.0])]
    updates, _ = rule.updates(tuple(batch), 1, None, 100.0)
    assert updates.client_ids.tolist() == [4, 8]
    torch.testing.assert_close(new_model(rule, batch, 1, {1: torch.zeros(2)}.__getitem__),
                               torch.tensor([1.0, 1.0]))


def test_fedfix_aggregates_what_arrived_in_each_window_weighted_by_samples():
    """Every interval: x <- x + lr sum_i n_i delta_i / sum_i n_i over the window's arrivals:
    [1, 0] with 10 samples and [0, 1] with 30, lr 1: + [0.25, 0.75]. An empty window makes
    no version."""
    rule = fedfix(interval_s=2.0, lr=1.0)
    assert rule.interval_s == 2.0
    a, b = arrival(0, 1, 0, [1.0, 0.0], 10), arrival(1, 2, 0, [0.0, 1.0], 30)
    state = rule.arrive(rule.arrive(rule.init(), a, 0.5).state, b, 1.5).state
    assert rule.arrive(rule.init(), a, 0.5).aggregate == ()  # never on arrival
    tick = rule.tick(state, 2.0)
    assert tick.aggregate == (a, b) and tick.state == ()
    torch.testing.assert_close(new_model(rule, tick.aggregate, 0, {0: torch.zeros(2)}.__getitem__),
                               torch.tensor([0.25, 0.75]))
    assert rule.tick(tick.state, 4.0).aggregate == ()


def test_sync_is_the_synchronous_protocol():
    assert not SERVER_RULES.make("sync").asynchronous
    assert all(SERVER_RULES.make(name).asynchronous for name in SERVER_RULES.names()
               if name != "sync")


@pytest.mark.parametrize("name", ["fedasync", "fedbuff", "fedfix", "fedcompass"])
def test_rules_are_pure_of_their_state(name):
    """Deciding twice from the same state gives the same decision (no hidden state), and the
    state a decision returns is what the next one starts from."""
    rule = SERVER_RULES.make(name)
    d = arrival(0, 1, 0, [1.0, 1.0])
    if rule.assigns_steps:
        state = rule.init()
        state, steps, _ = rule.assign(state, 1, 0.0)
        assert steps == rule.max_local_steps  # no speed estimate yet: Q_max
        return
    first, again = rule.arrive(rule.init(), d, 1.0), rule.arrive(rule.init(), d, 1.0)
    assert first == again
