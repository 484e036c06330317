"""The world's per-client laws: device profiles (scenarios/devices.py) and availability
(scenarios/availability.py). Expected numbers are closed forms or hand computations."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from engine.resolve import resolve
from scenarios.availability import AVAILABILITY
from scenarios.devices import Devices, build_devices
from scenarios.distributions import DISTRIBUTIONS
from tests.conftest import small_config

N_DRAWS = 200_000


def _dist(kind: str, where: str = "devices.step_s", **params):
    return DISTRIBUTIONS.make(kind, where, **params)


def _draws(seed: int = 0, **kwargs) -> np.ndarray:
    return _dist(**kwargs).draw(N_DRAWS, np.random.default_rng(seed))


def devices_from(n: int, seeds: SeedTree, **section) -> Devices:
    """The devices a run builds from its `devices` section (defaults, `section` replacing)."""
    cfg = small_config(devices=section)
    return build_devices(resolve(cfg).devices, cfg.devices.path, n, seeds)


def _one_line_error(err: pytest.ExceptionInfo, key: str) -> str:
    message = str(err.value)
    assert message.startswith(f"{key}:"), message
    assert "\n" not in message
    return message


# --- distributions -----------------------------------------------------------------------


def test_constant_is_the_value():
    x = _draws(kind="constant", value=2.5)
    assert x.dtype == np.float64 and x.shape == (N_DRAWS,)
    assert np.all(x == 2.5)


def test_uniform_moments_and_quartiles():
    x = _draws(kind="uniform", low=2.0, high=5.0)
    assert x.min() >= 2.0 and x.max() <= 5.0
    assert x.mean() == pytest.approx(3.5, abs=0.01)  # sd of the mean: 0.0019
    assert np.quantile(x, [0.25, 0.75]) == pytest.approx([2.75, 4.25], abs=0.015)


def test_lognormal_median_and_log_spread():
    x = _draws(kind="lognormal", median=2.0, sigma=0.5)
    assert x.min() > 0
    assert np.median(x) == pytest.approx(2.0, rel=0.01)
    assert np.log(x).std() == pytest.approx(0.5, rel=0.01)
    # quantile q of exp(N(log m, s)) is m * exp(s * z_q); z_0.9 = 1.2816
    assert np.quantile(x, 0.9) == pytest.approx(2.0 * np.exp(0.5 * 1.28155), rel=0.015)
    assert np.quantile(x, 0.1) == pytest.approx(2.0 * np.exp(-0.5 * 1.28155), rel=0.015)


def test_pareto_minimum_mean_and_tail():
    x = _draws(kind="pareto", scale=3.0, shape=3.0)
    assert x.min() >= 3.0 and x.min() == pytest.approx(3.0, abs=1e-3)
    assert x.mean() == pytest.approx(3.0 * 3.0 / 2.0, abs=0.03)  # sd of the mean: 0.006
    assert np.mean(x > 6.0) == pytest.approx(2.0**-3, abs=0.004)  # P(X > 2 scale) = 2^-shape


def test_tiers_frequencies_with_and_without_weights():
    x = _draws(kind="tiers", values=[1.0, 2.0, 4.0], weights=[1.0, 1.0, 2.0])
    assert set(np.unique(x)) == {1.0, 2.0, 4.0}
    assert [np.mean(x == v) for v in (1.0, 2.0, 4.0)] == pytest.approx([0.25, 0.25, 0.5],
                                                                       abs=0.005)
    y = _draws(kind="tiers", values=[1.0, 2.0, 4.0])
    assert [np.mean(y == v) for v in (1.0, 2.0, 4.0)] == pytest.approx([1 / 3] * 3, abs=0.005)


@pytest.mark.parametrize("params", [
    {"kind": "uniform", "low": 0.0, "high": 1.0},
    {"kind": "lognormal", "median": 1.0, "sigma": 1.0},
    {"kind": "pareto", "scale": 1.0, "shape": 2.0},
    {"kind": "tiers", "values": [1.0, 2.0]},
])
def test_same_seed_same_draws(params):
    assert np.array_equal(_draws(5, **params), _draws(5, **params))
    assert not np.array_equal(_draws(5, **params), _draws(6, **params))


def test_bad_tier_weights_are_one_line_errors():
    with pytest.raises(ConfigError) as err:
        _dist("tiers", values=[1.0, 2.0], weights=[0.0, 0.0])
    assert "weights must be >= 0 with a positive sum" in _one_line_error(err, "devices.step_s")


# --- devices -----------------------------------------------------------------------------

PROFILES = {
    "step_s": [0.1, 0.2, 0.5], "up_bps": [1e6, 2e6, 5e5], "down_bps": [4e6, 1e6, 2e6],
    "latency_s": [0.05, 0.1, 0.0],
}


def test_task_time_by_hand():
    dev = Devices(**{k: np.array(v) for k, v in PROFILES.items()})
    ids, steps = np.array([2, 0, 1]), np.array([3, 10, 1])
    # client 2: 0 + 1e6/2e6 + 3*0.5 + 2e6/5e5 = 0.5 + 1.5 + 4   = 6.0
    # client 0: 0.05 + 1e6/4e6 + 10*0.1 + 0  = 0.05 + 0.25 + 1  = 1.3  (never uploads)
    # client 1: 0.1 + 1e6/1e6 + 1*0.2 + 1e6/2e6 = 0.1 + 1 + 0.2 + 0.5 = 1.8
    got = dev.task_time(ids, steps, down_bytes=1e6, up_bytes=np.array([2e6, 0.0, 1e6]))
    assert got == pytest.approx([6.0, 1.3, 1.8])
    assert dev.compute_time(ids, steps) == pytest.approx([1.5, 1.0, 0.2])
    assert dev.compute_time(np.array([0, 1]), 4) == pytest.approx([0.4, 0.8])
    assert dev.task_time(np.array([1]), 2, 0.0, 0.0) == pytest.approx([0.1 + 0.4])


def test_build_devices_draws_each_quantity_from_its_own_stream():
    base = dict(step_s=dict(kind="lognormal", median=0.02, sigma=0.5),
                up_bps=dict(kind="uniform", low=1e5, high=1e6))
    changed = {**base, "up_bps": dict(kind="pareto", scale=1e5, shape=2.0)}
    a = devices_from(1000, SeedTree(3), **base)
    b = devices_from(1000, SeedTree(3), **base)
    c = devices_from(1000, SeedTree(3), **changed)
    for name in PROFILES:
        assert getattr(a, name).shape == (1000,) and getattr(a, name).dtype == np.float64
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert np.array_equal(a.step_s, c.step_s)  # another law for up_bps leaves step_s alone
    assert not np.array_equal(a.up_bps, c.up_bps)
    assert np.all(a.down_bps == 5e6) and np.all(a.latency_s == 0.05)  # the defaults
    assert not np.array_equal(a.step_s, devices_from(1000, SeedTree(4), **base).step_s)
    same_law = dict(kind="uniform", low=0.0, high=1.0)
    d = devices_from(5000, SeedTree(3), step_s=same_law, latency_s=same_law)
    assert abs(np.corrcoef(d.step_s, d.latency_s)[0, 1]) < 0.06  # independent streams


@pytest.mark.parametrize("name, dist", [
    ("up_bps", dict(kind="constant", value=0.0)),
    ("down_bps", dict(kind="uniform", low=0.0, high=1e6)),
    ("up_bps", dict(kind="tiers", values=[0.0, 1e6])),
    ("step_s", dict(kind="tiers", values=[-1.0, 1.0])),
])
def test_non_positive_bandwidths_are_config_errors(name, dist):
    with pytest.raises(ConfigError) as err:
        devices_from(10, SeedTree(0), **{name: dist})
    _one_line_error(err, f"devices.{name}")


def test_zero_weight_tier_at_zero_bandwidth_is_allowed():
    up = dict(kind="tiers", values=[0.0, 1e6], weights=[0.0, 1.0])
    assert np.all(devices_from(50, SeedTree(0), up_bps=up).up_bps == 1e6)


def _profile_table(ids: list[int], **override) -> pa.Table:
    rng = np.random.default_rng(1)
    k = len(ids)
    cols = {"client_id": ids, "step_s": rng.uniform(0.01, 0.1, k),
            "up_bps": rng.uniform(1e5, 1e6, k), "down_bps": rng.uniform(1e6, 1e7, k),
            "latency_s": rng.uniform(0.0, 0.2, k)}
    cols.update(override)
    return pa.table(cols)


def _write(table: pa.Table, path) -> str:
    if str(path).endswith(".csv"):
        pa_csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return str(path)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_devices_file_round_trip(tmp_path, suffix):
    ids = [3, 0, 4, 1, 2]  # any row order
    table = _profile_table(ids)
    path = _write(table, tmp_path / f"devices.{suffix}")
    dev = devices_from(5, SeedTree(0), path=path)
    order = np.argsort(ids)
    for name in PROFILES:
        assert np.allclose(getattr(dev, name), table.column(name).to_numpy()[order], rtol=1e-12)


@pytest.mark.parametrize("table, words", [
    (_profile_table([0, 1, 2, 3]).drop_columns(["latency_s"]), "latency_s"),
    (_profile_table([0, 1, 3, 4]), "missing client ids 2"),
    (_profile_table([0, 1, 2, 3, 3, 4]), "duplicate client ids 3"),
    (_profile_table([0, 1, 2, 3, 4, 5]), "out of range"),
    (_profile_table([0, 1, 2, 3, 4], up_bps=[1e6, 1e6, 0.0, 1e6, 1e6]), "up_bps must be"),
    (_profile_table([0, 1, 2, 3, 4], client_id=["a", "b", "c", "d", "e"]), "not numeric"),
])
@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_bad_device_files_are_one_line_errors(tmp_path, table, words, suffix):
    path = _write(table, tmp_path / f"devices.{suffix}")
    with pytest.raises(ConfigError) as err:
        devices_from(5, SeedTree(0), path=path)
    assert words in _one_line_error(err, "devices.path")


def test_missing_or_unknown_device_files(tmp_path):
    for path in (tmp_path / "absent.csv", tmp_path / "devices.json"):
        with pytest.raises(ConfigError) as err:
            devices_from(5, SeedTree(0), path=str(path))
        _one_line_error(err, "devices.path")
    garbled = tmp_path / "garbled.parquet"
    garbled.write_text("not parquet at all\nreally\n")
    with pytest.raises(ConfigError) as err:
        devices_from(5, SeedTree(0), path=str(garbled))
    assert "cannot read" in _one_line_error(err, "devices.path")


# --- availability ------------------------------------------------------------------------


def _availability(n: int, seed: int = 0, kind: str = "always", **params):
    engine = {"num_clients": n, "seeds": SeedTree(seed)}
    return AVAILABILITY.make(kind, "population.availability", engine, **params)


def _schedule(avail, slots) -> np.ndarray:
    return np.stack([avail.mask(t) for t in slots])


def test_always_online():
    avail = _availability(7)
    assert _schedule(avail, range(5)).all()
    assert avail.local_steps(0) is None and np.all(avail.rates == 1.0)


def test_bernoulli_per_client_rates():
    prob = dict(kind="uniform", low=0.1, high=0.9)
    avail = _availability(200, kind="bernoulli", probability=prob)
    p = avail.rates
    assert p.shape == (200,) and p.min() >= 0.1 and p.max() <= 0.9 and p.std() > 0.15
    online = _schedule(avail, range(4000))
    assert online.dtype == bool and online.shape == (4000, 200)
    assert np.abs(online.mean(axis=0) - p).max() < 0.05  # 6 sd of a 4000-slot mean
    assert avail.local_steps(3) is None


def test_bernoulli_probabilities_are_clipped():
    prob = dict(kind="uniform", low=0.5, high=1.5)
    avail = _availability(500, kind="bernoulli", probability=prob)
    assert avail.rates.max() == 1.0 and avail.rates.min() >= 0.5
    always_on = avail.rates == 1.0
    assert always_on.sum() > 100
    assert _schedule(avail, range(50))[:, always_on].all()


def test_bernoulli_mask_depends_only_on_seed_and_slot():
    prob = dict(kind="uniform", low=0.1, high=0.9)
    a = _availability(300, seed=9, kind="bernoulli", probability=prob)
    b = _availability(300, seed=9, kind="bernoulli", probability=prob)
    forward = _schedule(a, range(20))
    assert np.array_equal(forward[::-1], _schedule(b, range(19, -1, -1)))
    assert np.array_equal(a.mask(np.int64(4)), forward[4])
    other = _availability(300, seed=10, kind="bernoulli", probability=prob)
    assert not np.array_equal(forward, _schedule(other, range(20)))


@pytest.mark.parametrize("period, fraction", [(24, 0.25), (10, 0.5), (7, 1.0)])
def test_cyclic_windows_are_exact(period, fraction):
    avail = _availability(500, kind="cyclic", period=period, online_fraction=fraction)
    online = _schedule(avail, range(5 * period)).astype(int)
    window = round(fraction * period)
    for offset in range(period):  # every run of `period` consecutive slots, any alignment
        assert np.all(online[offset:offset + period].sum(axis=0) == window)
    assert online.mean() == pytest.approx(fraction) and np.all(avail.rates == fraction)
    # each client's on-slots are one contiguous window (cyclically)
    flips = np.abs(np.diff(online[:period + 1], axis=0)).sum(axis=0)
    assert np.all(flips <= 2)
    if fraction < 1:  # phases differ between clients
        assert len({tuple(col) for col in online[:period].T}) == period


def _on_run_lengths(online: np.ndarray) -> np.ndarray:
    """Lengths of the on-runs of each client (columns of online [T, n]) that both start and
    end inside the horizon."""
    T = online.shape[0]
    padded = np.zeros((online.shape[1], T + 2), dtype=np.int8)
    padded[:, 1:-1] = online.T
    edges = np.diff(padded, axis=1).ravel()  # rows of T + 1 edges
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    inside = (starts % (T + 1) > 0) & (ends % (T + 1) < T)
    return (ends - starts)[inside]


def test_markov_stationary_rate_and_run_lengths():
    avail = _availability(2000, kind="markov", p_on_off=0.2, p_off_on=0.05)
    assert np.all(avail.rates == pytest.approx(0.2))  # 0.05 / (0.2 + 0.05)
    online = _schedule(avail, range(2000))
    assert online[0].mean() == pytest.approx(0.2, abs=0.03)  # starts stationary
    assert online.mean() == pytest.approx(0.2, abs=0.01)
    assert _on_run_lengths(online).mean() == pytest.approx(1 / 0.2, rel=0.02)
    was_off = ~online[:-1]
    assert (online[1:] & was_off).sum() / was_off.sum() == pytest.approx(0.05, abs=0.002)


def test_markov_masks_do_not_depend_on_query_order():
    cfg = {"kind": "markov", "p_on_off": 0.3, "p_off_on": 0.1}
    forward = _schedule(_availability(400, seed=2, **cfg), range(300))
    backward = _availability(400, seed=2, **cfg)
    assert np.array_equal(_schedule(backward, range(299, -1, -1)), forward[::-1])
    jumpy = _availability(400, seed=2, **cfg)
    order = np.random.default_rng(0).permutation(300)
    assert np.array_equal(_schedule(jumpy, order), forward[order])
    restored = pickle.loads(pickle.dumps(jumpy))
    assert np.array_equal(_schedule(restored, [5, 250, 64, 63]), forward[[5, 250, 64, 63]])
    assert not np.array_equal(_schedule(_availability(400, seed=3, **cfg), range(300)), forward)


def test_markov_absorbing_and_frozen_chains():
    assert _schedule(_availability(50, kind="markov", p_on_off=0.0, p_off_on=0.5),
                     range(10)).all()
    with pytest.raises(ConfigError) as err:
        _availability(50, kind="markov", p_on_off=0.0, p_off_on=0.0)
    _one_line_error(err, "population.availability.p_on_off")


TRACE = {"client_id": [0, 1, 0, 3], "start": [0.0, 2.5, 5.0, 1.0], "end": [3.0, 4.0, 6.0, 1.0]}
EXPECTED_TRACE = np.array([  # clients 0..3 in slots 0..6; client 2 has no interval
    [1, 0, 0, 0],  # slot 0: client 0 in [0, 3)
    [1, 0, 0, 0],  # slot 1: client 3's [1, 1) is empty
    [1, 0, 0, 0],
    [0, 1, 0, 0],  # slot 3: [0, 3) has ended, client 1's [2.5, 4) holds 3
    [0, 0, 0, 0],
    [1, 0, 0, 0],  # slot 5: client 0's [5, 6)
    [0, 0, 0, 0],
], dtype=bool)


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_trace_by_hand(tmp_path, suffix):
    path = _write(pa.table(TRACE), tmp_path / f"trace.{suffix}")
    avail = _availability(4, kind="trace", path=path)
    assert avail.rates is None and avail.local_steps(0) is None
    assert np.array_equal(_schedule(avail, range(7)), EXPECTED_TRACE)
    assert np.array_equal(_schedule(avail, range(6, -1, -1)), EXPECTED_TRACE[::-1])


@pytest.mark.parametrize("change, words", [
    ({"client_id": [0, 1, 0, 4]}, "out of range"),
    ({"client_id": [0, -1, 0, 3]}, "out of range"),
    ({"end": [3.0, 2.0, 6.0, 1.0]}, "end < start"),
])
def test_bad_traces_are_one_line_errors(tmp_path, change, words):
    path = _write(pa.table({**TRACE, **change}), tmp_path / "trace.csv")
    with pytest.raises(ConfigError) as err:
        _availability(4, kind="trace", path=path)
    assert words in _one_line_error(err, "population.availability.path")


def test_trace_missing_file_column_or_path(tmp_path):
    no_end = _write(pa.table({"client_id": [0], "start": [0.0]}), tmp_path / "trace.parquet")
    for path in (str(tmp_path / "absent.csv"), no_end, None):
        with pytest.raises(ConfigError) as err:
            _availability(4, kind="trace", path=path)
        _one_line_error(err, "population.availability.path")


def test_anarchic_presence_and_local_steps():
    steps = dict(kind="uniform", low=1.0, high=8.0)
    prob = dict(kind="uniform", low=0.2, high=0.8)
    avail = _availability(1000, kind="anarchic", probability=prob, steps=steps)
    bern = _availability(1000, kind="bernoulli", probability=prob)
    assert np.array_equal(avail.rates, bern.rates)
    chosen = []
    for t in range(200):
        online, k = avail.mask(t), avail.local_steps(t)
        assert np.array_equal(online, bern.mask(t))  # online like bernoulli
        assert k.dtype == np.int64 and k.shape == (1000,)
        assert np.all(k[~online] == 0)  # meaningless for offline clients
        assert k[online].min() >= 1 and k[online].max() <= 8
        chosen.append(k)
    chosen = np.stack(chosen)
    on = chosen > 0
    assert on.mean(axis=0) == pytest.approx(avail.rates, abs=0.15)
    assert chosen[on].mean() == pytest.approx(4.5, abs=0.05)  # rint(U[1, 8]) has mean 4.5
    assert set(np.unique(chosen[on])) == set(range(1, 9))
    assert np.array_equal(avail.local_steps(17), chosen[17])  # per (seed, client, slot)
    assert np.array_equal(_availability(1000, kind="anarchic", probability=prob,
                                        steps=steps).local_steps(17), chosen[17])


def test_anarchic_steps_are_at_least_one():
    steps = dict(kind="lognormal", median=0.3, sigma=0.2)
    avail = _availability(300, kind="anarchic", steps=steps)
    k = avail.local_steps(0)
    assert np.all(k[avail.mask(0)] == 1)
    with pytest.raises(ConfigError) as err:
        _availability(10, kind="anarchic",
                      steps=dict(kind="tiers", values=[1.0], weights=[-1.0]))
    _one_line_error(err, "population.availability.steps")


@pytest.mark.parametrize("kind", ["always", "bernoulli", "cyclic", "markov", "anarchic"])
def test_availability_pickles_and_rejects_bad_slots(kind):
    avail = _availability(64, seed=1, kind=kind)
    restored = pickle.loads(pickle.dumps(avail))
    assert type(restored) is type(avail)
    assert np.array_equal(_schedule(restored, range(10)), _schedule(avail, range(10)))
    with pytest.raises(ValueError):
        avail.mask(-1)
