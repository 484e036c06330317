"""FedAU (Wang & Ji, 2024) by hand and on a problem with a known optimum; FedAsync / FedBuff
staleness functions by hand."""

import numpy as np
import pytest
import torch

from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.fedau import interval_weights
from policies.registry import build_aggregator, pools_may_reduce, stage_specs
from policies.staleness import STALENESS, staleness_weight


def one_hot_round(ids: list[int], num_clients: int) -> Updates:
    """Client n sends delta e_n, so (N / server_lr) * step is the vector of weights omega.
    A round where nobody reports has no deltas at all (as Updates.empty())."""
    k = len(ids)
    ids_t = torch.tensor(ids, dtype=torch.int64)
    deltas = torch.eye(num_clients)[ids_t] if k else None
    return Updates(deltas, torch.ones(k), ids_t, torch.zeros(k), torch.ones(k, dtype=torch.int64))


def fedau_weights_by_round(schedule: list[list[int]], num_clients: int, cutoff: int
                           ) -> tuple[np.ndarray, tuple]:
    agg = build_aggregator(stage_specs([{"fedau": {"cutoff": cutoff}}]),
                           num_clients=num_clients)
    state, rows = agg.init(torch.zeros(num_clients)), []
    for ids in schedule:
        step, state = agg.update(one_hot_round(ids, num_clients), state)
        rows.append(step.double().numpy() * num_clients)
    return np.array(rows), state


# Rounds 0..7, K = 3. Client 0 first takes part in round 5; client 1 in rounds 1, 2, 6;
# client 2 in rounds 0, 3, 7; nobody in round 4.
SCHEDULE = [[2], [1], [1], [2], [], [0], [0, 1], [0, 2]]
# Intervals recorded (S += 1 every round; record S when participating or when S reaches K):
#   client 0: K at round 2 (rounds 0-2 absent), K at round 5 (participates as S hits 3), 1, 1
#   client 1: 2 at round 1, 1 at round 2, K at round 5 (rounds 3-5 absent), 1 at round 6
#   client 2: 1 at round 0, K at round 3 (one interval of 3, not two), K at round 6, 1 at round 7
# omega at round t = mean of the intervals recorded before round t, 1 while there is none:
EXPECTED_OMEGA = [
    [0, 0, 1],          # r0: client 2, nothing recorded yet
    [0, 1, 0],          # r1: client 1, nothing recorded yet
    [0, 2, 0],          # r2: client 1, mean(2)
    [0, 0, 1],          # r3: client 2, mean(1): its interval of 3 ends now, used from round 4
    [0, 0, 0],          # r4: nobody
    [3, 0, 0],          # r5: client 0, mean(3): the cutoff interval closed at round 2
    [3, 2, 0],          # r6: client 0 mean(3, 3); client 1 mean(2, 1, 3)
    [7 / 3, 0, 7 / 3],  # r7: client 0 mean(3, 3, 1); client 2 mean(1, 3, 3)
]
# What each client would get in round 8: means of (3, 3, 1, 1), (2, 1, 3, 1), (1, 3, 3, 1).
EXPECTED_NEXT = [2.0, 7 / 4, 2.0]


def test_fedau_hand_worked_weights():
    omega, state = fedau_weights_by_round(SCHEDULE, num_clients=3, cutoff=3)
    np.testing.assert_allclose(omega, np.array(EXPECTED_OMEGA), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(interval_weights(state, 3).numpy(), EXPECTED_NEXT, rtol=1e-12)
    assert int(state.round) == 8  # the empty round 4 counted too


def eager_fedau_weights(participation: np.ndarray, cutoff: int) -> np.ndarray:
    """The paper's per-round estimator, run for every client in every round (the stage only
    sees participants and counts lazily). participation [T, N] bool -> omega [T, N], 0 where
    absent."""
    rounds, n = participation.shape
    counter, intervals = np.zeros(n, dtype=int), [[] for _ in range(n)]
    omega = np.zeros((rounds, n))
    for t in range(rounds):
        for i in range(n):
            if participation[t, i]:
                omega[t, i] = np.mean(intervals[i]) if intervals[i] else 1.0
            counter[i] += 1
            if participation[t, i] or counter[i] == cutoff:
                intervals[i].append(counter[i])
                counter[i] = 0
    return omega


@pytest.mark.parametrize("cutoff", [1, 2, 5, 50])
def test_fedau_lazy_counting_matches_the_per_round_estimator(cutoff):
    rng = np.random.default_rng(cutoff)
    n, rounds = 6, 120
    p = np.array([0.02, 0.1, 0.25, 0.5, 0.8, 1.0])
    participation = rng.random((rounds, n)) < p
    schedule = [np.flatnonzero(row).tolist() for row in participation]
    omega, _ = fedau_weights_by_round(schedule, n, cutoff)
    np.testing.assert_allclose(omega, eager_fedau_weights(participation, cutoff), rtol=1e-6)


def test_fedau_server_lr_and_the_one_over_n_scale():
    agg = build_aggregator(stage_specs([{"fedau": {"server_lr": 0.5}}]), num_clients=4)
    u = Updates(torch.tensor([[2.0, 4.0], [6.0, -8.0]]), torch.tensor([10.0, 30.0]),
                torch.tensor([1, 3]), torch.zeros(2), torch.tensor([10, 30]))
    step, _ = agg.update(u, agg.init(torch.zeros(2)))
    # omega = 1 in the first round; sample counts play no part: 0.5 * (1/4) * ([2, 4] + [6, -8])
    assert torch.allclose(step, torch.tensor([1.0, -0.5]))


def test_fedau_registry_errors_and_pools_do_not_pre_reduce():
    with pytest.raises(ConfigError, match="num_clients .*required"):
        build_aggregator(stage_specs(["fedau"]))
    with pytest.raises(ConfigError, match=r"aggregation\[0\]\.fedau\.num_clients: set by the "
                                          "engine"):
        build_aggregator(stage_specs([{"fedau": {"num_clients": 5}}]), num_clients=5)
    with pytest.raises(ConfigError, match=r"fedau\.cutoff"):
        build_aggregator(stage_specs([{"fedau": {"cutoff": 0}}]), num_clients=5)
    assert not pools_may_reduce(stage_specs(["fedau"]))
    agg = build_aggregator(stage_specs(["fedau"]), num_clients=2)
    with pytest.raises(ValueError, match="client ids must lie in"):
        agg.update(one_hot_round([0, 2], 3), agg.init(torch.zeros(3)))
    # a stage without the parameter ignores the population size
    build_aggregator(stage_specs(["fedavg"]), num_clients=5)


# Known optimum: f_n(x) = 0.5 ||x - c_n||^2, so argmin of (1/N) sum_n f_n is mean(c_n).
N, DIM = 20, 5


def quadratic_problem() -> tuple[np.ndarray, np.ndarray]:
    """Targets c_n spread along one direction; participation p_n grows along it too, so
    FedAvg over participants leans to the frequent clients' end."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=DIM)
    u /= np.linalg.norm(u)
    c = 2.0 * np.linspace(-1, 1, N)[:, None] * u + 0.3 * rng.normal(size=(N, DIM))
    return c, np.linspace(0.05, 0.9, N)


def local_deltas(x: np.ndarray, targets: np.ndarray, steps: int = 5, lr: float = 0.1
                 ) -> np.ndarray:
    """`steps` local gradient steps on 0.5 ||y - c||^2 from y = x; returns y - x."""
    y = np.repeat(x[None], len(targets), axis=0)
    for _ in range(steps):
        y = y - lr * (y - targets)
    return y - x


def final_distance(name: str, rounds: int = 400, seed: int = 1) -> float:
    c, p = quadratic_problem()
    agg = build_aggregator(stage_specs([name]), num_clients=N)
    state, x = agg.init(torch.zeros(DIM)), np.zeros(DIM)
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        ids = np.flatnonzero(rng.random(N) < p)
        k = ids.size
        u = Updates(torch.tensor(local_deltas(x, c[ids]), dtype=torch.float32), torch.ones(k),
                    torch.from_numpy(ids), torch.zeros(k), torch.ones(k, dtype=torch.int64))
        step, state = agg.update(u, state)
        x = x + step.double().numpy() / (1 + r / 50)  # decaying server step
    return float(np.linalg.norm(x - c.mean(axis=0)))


def test_fedau_removes_the_participation_bias_of_fedavg():
    fedavg_distance = final_distance("fedavg")
    fedau_distance = final_distance("fedau")
    assert fedavg_distance > 0.4  # FedAvg settles near the p-weighted mean of the c_n
    assert fedau_distance < 0.5 * fedavg_distance
    assert fedau_distance < 0.25


@pytest.mark.parametrize("kind, params, expected", [
    ("constant", {}, [1.0, 1.0, 1.0, 1.0]),
    # (1 + tau)^-0.5 at tau = 0, 1, 4, 10
    ("polynomial", {"a": 0.5}, [1.0, 1 / np.sqrt(2), 1 / np.sqrt(5), 1 / np.sqrt(11)]),
    ("polynomial", {"a": 2.0}, [1.0, 1 / 4, 1 / 25, 1 / 121]),
    # 1 up to b = 4, then 1 / (a (tau - b) + 1): tau = 10 -> 1 / (0.5 * 6 + 1)
    ("hinge", {"a": 0.5, "b": 4.0}, [1.0, 1.0, 1.0, 1 / 4]),
    ("hinge", {"a": 2.0, "b": 0.0}, [1.0, 1 / 3, 1 / 9, 1 / 21]),
    ("sqrt", {}, [1.0, 1 / np.sqrt(2), 1 / np.sqrt(5), 1 / np.sqrt(11)]),
])
def test_staleness_values_by_hand(kind, params, expected):
    fn = STALENESS.make(kind, **params)
    tau = np.array([0, 1, 4, 10])
    np.testing.assert_allclose(staleness_weight(fn, tau), expected, rtol=1e-12)
    assert float(staleness_weight(fn, 4)) == pytest.approx(expected[2], rel=1e-12)


def test_staleness_rejects_bad_input():
    assert set(STALENESS) == {"constant", "polynomial", "hinge", "sqrt"}
    with pytest.raises(ConfigError, match="allowed"):
        STALENESS.make("exponential")
    with pytest.raises(ConfigError, match="sqrt' takes no parameter 'a'"):
        STALENESS.make("sqrt", a=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        staleness_weight(STALENESS.make("polynomial"), np.array([1, -1]))
