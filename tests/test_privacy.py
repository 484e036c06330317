"""DP-FedAvg's noised reduction and the RDP accountant: values by hand, the noise law measured,
and the accountant against a numerical integration and published numbers."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from engine.core.errors import ConfigError
from policies.privacy import (
    dp_gaussian,
    rdp_epsilon,
    rdp_to_epsilon,
    sampled_gaussian_rdp,
)
from policies.registry import AGGREGATION, build_aggregator, stage_specs
from tests.test_policies import updates

# ---------------------------------------------------------------- the stage

DELTAS = [[3.0, 4.0], [0.3, 0.4], [-6.0, 8.0]]  # norms 5, 0.5, 10
CLIPPED_SUM = [0.6 + 0.3 - 0.6, 0.8 + 0.4 + 0.8]  # clip = 1: [0.6, 0.8], as is, [-0.6, 0.8]


def run(agg, u, rounds=1, params=2):
    state, steps = agg.init(torch.zeros(params)), []
    for _ in range(rounds):
        step, state = agg.update(u, state)
        steps.append(step)
    return steps, state


def test_without_noise_it_is_the_clipped_sum_over_the_expected_clients():
    u = updates(DELTAS, [10, 1, 100])  # weights are not used: each client counts once
    (step,), _ = run(dp_gaussian(noise_multiplier=0.0, clip=1.0, expected_clients=5, seed=0), u)
    assert torch.allclose(step, torch.tensor(CLIPPED_SUM) / 5)
    (step,), _ = run(dp_gaussian(noise_multiplier=0.0, clip=1.0, seed=0), u)  # None: K = 3
    assert torch.allclose(step, torch.tensor(CLIPPED_SUM) / 3)
    (step,), _ = run(dp_gaussian(noise_multiplier=0.0, clip=20.0, expected_clients=2, seed=0), u)
    assert torch.allclose(step, torch.tensor([-2.7, 12.4]) / 2)  # nothing clipped


def test_noise_std_is_multiplier_times_clip_over_expected_clients():
    p, rounds, z, clip, k_exp = 2000, 40, 2.0, 0.5, 4
    u = updates(torch.randn(3, p, generator=torch.Generator().manual_seed(0)).tolist(), [1, 1, 1])
    exact, _ = run(dp_gaussian(noise_multiplier=0.0, clip=clip, expected_clients=k_exp, seed=0), u,
                   params=p)
    noisy, _ = run(dp_gaussian(noise_multiplier=z, clip=clip, expected_clients=k_exp, seed=3), u,
                   rounds=rounds, params=p)
    noise = torch.stack(noisy).double() - exact[0].double()  # [rounds, P]
    std = z * clip / k_exp  # 0.25
    assert abs(noise.std().item() / std - 1) < 0.02  # 80000 draws: standard error 0.25 %
    assert abs(noise.mean().item()) < 4 * std / math.sqrt(noise.numel())
    correlation = torch.corrcoef(noise[:2])[0, 1].item()  # fresh noise every round
    assert abs(correlation) < 0.1


def test_noise_is_deterministic_per_seed_and_round():
    u = updates(DELTAS, [1, 1, 1])
    a, state = run(dp_gaussian(seed=5), u, rounds=3, params=2)
    b, _ = run(dp_gaussian(seed=5), u, rounds=3, params=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert int(state.round) == 3
    assert not torch.equal(a[0], a[1])  # the round keys the noise
    c, _ = run(dp_gaussian(seed=6), u, rounds=1, params=2)
    assert not torch.equal(a[0], c[0])  # so does the seed
    # the noise does not depend on the updates: other deltas, same noise in round 0
    other = updates([[0.1, 0.0]], [1])
    d, _ = run(dp_gaussian(seed=5, clip=1.0, expected_clients=3), other, params=2)
    e, _ = run(dp_gaussian(seed=5, clip=1.0, expected_clients=3), u, params=2)
    assert torch.allclose(d[0] - torch.tensor([0.1, 0.0]) / 3,
                          e[0] - torch.tensor(CLIPPED_SUM) / 3, atol=1e-6)


def test_order_of_clients_does_not_change_the_bits():
    u = updates(DELTAS, [1, 2, 3], ids=[4, 9, 2])
    a, _ = run(dp_gaussian(seed=1), u)
    b, _ = run(dp_gaussian(seed=1), u.take(torch.tensor([2, 0, 1])))
    assert torch.equal(a[0], b[0])


def test_a_round_without_updates_still_adds_noise_with_a_fixed_denominator():
    empty = updates(torch.zeros(0, 3).tolist(), [])._replace(deltas=None)
    agg = dp_gaussian(noise_multiplier=1.0, clip=2.0, expected_clients=4, seed=2)
    (step,), state = run(agg, empty, params=3)
    assert step.shape == (3,) and step.abs().sum() > 0 and int(state.round) == 1
    (step,), _ = run(dp_gaussian(seed=0), empty, params=3)  # no fixed denominator: nothing to add
    assert torch.equal(step, torch.zeros(3))


def test_registered_holistic_reduction():
    factory = AGGREGATION["dp_gaussian"]
    assert factory is dp_gaussian
    assert factory.stage_kind == "reduction" and not factory.decomposable
    assert factory.permutation_invariant
    pre_reduced = updates(DELTAS, [1, 1, 1])._replace(deltas=None)
    with pytest.raises(ValueError, match="needs every client's delta"):
        run(dp_gaussian(seed=0), pre_reduced)


def test_builds_from_config_and_checks_its_parameters():
    agg = build_aggregator(stage_specs([
        {"dp_gaussian": {"noise_multiplier": 0.0, "clip": 1.0,
                                              "expected_clients": 5}},
        {"server_sgd": {"lr": 2.0}},
    ]))
    (step,), _ = run(agg, updates(DELTAS, [1, 1, 1]))
    assert torch.allclose(step, 2 * torch.tensor(CLIPPED_SUM) / 5)
    for kwargs, key in [({"noise_multiplier": -1.0}, "noise_multiplier"), ({"clip": 0.0}, "clip"),
                        ({"expected_clients": 0}, "expected_clients"), ({"seed": 3}, "seed")]:
        with pytest.raises(ConfigError, match=rf"aggregation\[0\]\.dp_gaussian\.{key}:"):
            build_aggregator(stage_specs([{"dp_gaussian": kwargs}]))


def test_the_noise_follows_the_run_seed(tmp_path):
    """The stage draws its seed from the run's seed tree (stream aggregation.dp_gaussian at
    its position): two run seeds give different noise, the same seed the same bits."""
    from engine.core.seeds import SeedTree

    u = updates(DELTAS, [1, 1, 1])
    specs = stage_specs([{"dp_gaussian": {"noise_multiplier": 1.0, "clip": 1.0}}])

    def step(seed):
        return run(build_aggregator(specs, seeds=SeedTree(seed)), u)[0][0]

    assert torch.equal(step(1), step(1))
    assert not torch.equal(step(1), step(2))
    shifted = stage_specs(["clip_per_client", {"dp_gaussian": {"noise_multiplier": 1.0}}])
    other = run(build_aggregator(shifted, seeds=SeedTree(1)), u)[0][0]
    assert not torch.equal(other, step(1))  # another position, another stream


def test_an_asynchronous_server_accounts_each_clients_own_steps(tmp_path):
    """FedBuff samples nobody: after each version the epsilon reported is the Gaussian
    mechanism's (q = 1) composed over the steps of the client that was in the most of them
    (counted independently here from the clients table)."""
    from engine.backends.runtime import RuntimeOptions
    from engine.experiment import run_experiment
    from engine.records.logs import read_table
    from tests.conftest import small_config

    cfg = small_config(rounds=6, server={"mode": "fedbuff", "buffer": 3, "concurrency": 5,
                                         "dp_delta": 1e-4},
                       aggregation={"dp_gaussian": {"noise_multiplier": 2.0, "clip": 0.5}})
    result = run_experiment(cfg, RuntimeOptions("inline"), tmp_path, False)
    rounds = read_table(result.log_dir, "rounds").sort_by("round").to_pylist()
    clients = read_table(result.log_dir, "clients").to_pylist()
    counts: dict[int, int] = {}
    for row in rounds:
        for c in clients:
            if c["round"] == row["round"] and c["status"] == "completed":
                counts[c["client_id"]] = counts.get(c["client_id"], 0) + 1
        expected = rdp_epsilon(2.0, 1.0, max(counts.values()), 1e-4)
        assert row["dp_epsilon"] == pytest.approx(expected, rel=1e-12)
    assert max(counts.values()) > 1  # some client contributed twice


# ---------------------------------------------------------------- the accountant


def numerical_rdp(sigma: float, q: float, alpha: int) -> float:
    """log(E_{z ~ N(0, s^2)} [((1 - q) + q * N(z; 1, s^2) / N(z; 0, s^2))^alpha]) / (alpha - 1),
    the RDP of the sampled Gaussian mechanism (Mironov et al., 2019, Theorem 4/5) by quadrature
    of the defining integral, with none of the binomial expansion."""

    def log_integrand(z: float) -> float:  # in log space: the ratio overflows far out
        log_density = -z * z / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
        log_mix = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return float(log_density + alpha * log_mix)

    # the mass lies between the two means 0 and alpha (the top term of the mixture's power);
    # the integrand is scaled by exp(-top) so that large orders do not overflow
    lo, hi = -40 * sigma, alpha + 40 * sigma
    top = max(log_integrand(z) for z in np.linspace(lo, hi, 4001))
    value, _ = integrate.quad(lambda z: math.exp(log_integrand(z) - top), lo, hi,
                              points=[0.0, 1.0, alpha / 2, alpha], epsabs=0, epsrel=1e-13,
                              limit=500)
    return (top + math.log(value)) / (alpha - 1)


def test_q_one_is_the_gaussian_mechanism():
    for sigma, alpha in [(1.0, 2), (0.7, 5), (3.0, 32)]:
        assert sampled_gaussian_rdp(sigma, 1.0, alpha) == pytest.approx(alpha / (2 * sigma**2))
    # one order: eps = T * alpha / (2 sigma^2) + log(1 / delta) / (alpha - 1) by hand
    eps = rdp_epsilon(2.0, 1.0, 10, 1e-5, orders=[8])
    assert eps == pytest.approx(10 * 8 / 8 + math.log(1e5) / 7)
    # over orders 2..64 the minimiser of T a / (2 s^2) + log(1/d) / (a - 1), evaluated by hand
    by_hand = min(10 * a / 8 + math.log(1e5) / (a - 1) for a in range(2, 65))
    assert rdp_epsilon(2.0, 1.0, 10, 1e-5, orders=range(2, 65)) == pytest.approx(by_hand)


def test_order_two_closed_form():
    # A_2 = (1 - q)^2 + 2 q (1 - q) + q^2 e^{1 / s^2} = 1 + q^2 (e^{1 / s^2} - 1)
    for sigma, q in [(1.0, 0.1), (0.5, 0.01), (4.0, 0.3)]:
        expected = math.log1p(q * q * math.expm1(1 / sigma**2))
        assert sampled_gaussian_rdp(sigma, q, 2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("sigma, q", [(1.5, 0.1), (0.8, 0.02), (4.0, 0.01)])
def test_rdp_matches_numerical_integration(sigma, q):
    for alpha in [2, 3, 8, 16, 40]:
        assert sampled_gaussian_rdp(sigma, q, alpha) == pytest.approx(
            numerical_rdp(sigma, q, alpha), rel=1e-7, abs=1e-14)


def test_epsilon_matches_an_independent_computation():
    """A small DP-SGD-like run composed and converted from the integrated RDP."""
    sigma, q, steps, delta, orders = 1.0, 0.05, 200, 1e-5, range(2, 41)
    reference = min(steps * numerical_rdp(sigma, q, a) + math.log(1 / delta) / (a - 1)
                    for a in orders)
    assert rdp_epsilon(sigma, q, steps, delta, orders=orders) == pytest.approx(reference,
                                                                                rel=1e-6)


def test_published_values():
    # Abadi et al., 2016 (DP-SGD): q = 0.01, sigma = 4, T = 10000, delta = 1e-5: the moments
    # accountant gives eps ~ 1.26; integer-order RDP with the standard conversion gives 1.2586
    assert rdp_epsilon(4.0, 0.01, 10_000, 1e-5) == pytest.approx(1.2586, abs=5e-4)
    # TF-Privacy's compute_dp_sgd_privacy: N = 60000, batch 256, sigma 1.12, 60 epochs,
    # delta 1e-5 "satisfies (2.92, 1e-5)-DP"
    steps = math.ceil(60 * 60_000 / 256)
    assert rdp_epsilon(1.12, 256 / 60_000, steps, 1e-5) == pytest.approx(2.92, abs=5e-3)


def test_improved_conversion_is_tighter():
    standard = rdp_epsilon(4.0, 0.01, 10_000, 1e-5)
    improved = rdp_epsilon(4.0, 0.01, 10_000, 1e-5, improved=True)
    assert 0.9 < improved < standard
    # Balle et al. 2020, Theorem 21 at one order, by hand
    rdp, a, d = 0.5, 10, 1e-6
    assert rdp_to_epsilon(rdp, a, d, improved=True) == pytest.approx(
        rdp + math.log(9 / 10) - (math.log(d) + math.log(10)) / 9)


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    by_steps = [rdp_epsilon(1.0, 0.01, t, 1e-5) for t in [10, 100, 1000, 10_000]]
    assert by_steps == sorted(by_steps) and len(set(by_steps)) == 4
    by_sigma = [rdp_epsilon(s, 0.01, 1000, 1e-5) for s in [0.6, 0.8, 1.0, 2.0, 8.0]]
    assert by_sigma == sorted(by_sigma, reverse=True) and len(set(by_sigma)) == 5
    by_rate = [rdp_epsilon(1.0, q, 1000, 1e-5) for q in [0.001, 0.01, 0.1, 1.0]]
    assert by_rate == sorted(by_rate)


def test_edge_cases():
    assert rdp_epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert rdp_epsilon(0.0, 0.0, 10, 1e-5) == 0.0  # nobody is ever sampled
    assert rdp_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    for args in [(-1.0, 0.1, 1, 1e-5), (1.0, 1.5, 1, 1e-5), (1.0, 0.1, -1, 1e-5),
                 (1.0, 0.1, 1, 0.0), (1.0, 0.1, 1, 1.0)]:
        with pytest.raises(ValueError, match="rdp_epsilon"):
            rdp_epsilon(*args)
    with pytest.raises(ValueError, match="orders"):
        rdp_epsilon(1.0, 0.1, 1, 1e-5, orders=[1.5, 2])
