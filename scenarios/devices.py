"""Device profiles: each client's compute speed, bandwidths and latency, drawn once per run.

A quantity is a `DistributionConfig` (constant, uniform, lognormal, Pareto or discrete tiers)
drawn with its own seeded stream, or a column of a Parquet/CSV file (`devices.path`). A client's
task time is latency + down_bytes / down_bps + steps * step_s + up_bytes / up_bps (the usual
compute-plus-communication model of system heterogeneity, as in FedScale: Lai et al., 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from engine.core.config import DevicesConfig, DistributionConfig
from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree

QUANTITIES = ("step_s", "up_bps", "down_bps", "latency_s")
BANDWIDTHS = ("up_bps", "down_bps")


def _constant(dist: DistributionConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.full(n, dist.value, dtype=np.float64)


def _uniform(dist: DistributionConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(dist.low, dist.high, n)


def _lognormal(dist: DistributionConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """exp(N(log median, sigma)): the median is `median`."""
    return rng.lognormal(np.log(dist.median), dist.sigma, n)


def _pareto(dist: DistributionConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pareto type I: minimum `scale`, tail index `shape` (mean scale*shape/(shape-1))."""
    return dist.scale * (1.0 + rng.pareto(dist.shape, n))


def _tiers(dist: DistributionConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    weights = np.ones(len(dist.values)) if dist.weights is None else np.asarray(dist.weights)
    return rng.choice(np.asarray(dist.values, dtype=np.float64), size=n, p=weights / weights.sum())


DISTRIBUTIONS: dict[str, Callable[[DistributionConfig, int, np.random.Generator], np.ndarray]] = {
    "constant": _constant, "uniform": _uniform, "lognormal": _lognormal, "pareto": _pareto,
    "tiers": _tiers,
}


def draw(dist: DistributionConfig, n: int, rng: np.random.Generator,
         where: str = "distribution") -> np.ndarray:
    """n independent draws (float64 [n]) from `dist`; `where` names the key in errors."""
    check_distribution(dist, where)
    return DISTRIBUTIONS[dist.kind](dist, n, rng).astype(np.float64, copy=False)


def check_distribution(dist: DistributionConfig, where: str) -> None:
    """What the config schema leaves open: tier weights must be >= 0 with a positive sum."""
    if dist.kind == "tiers" and dist.weights is not None:
        weights = np.asarray(dist.weights, dtype=np.float64)
        if np.any(weights < 0) or not weights.sum() > 0:
            raise ConfigError(f"{where}.weights: must be >= 0 with a positive sum "
                              f"(got {dist.weights})")


def smallest_value(dist: DistributionConfig) -> float | None:
    """The smallest value `dist` can yield; None when it yields only positive values
    (lognormal, Pareto)."""
    if dist.kind == "constant":
        return dist.value
    if dist.kind == "uniform":
        return dist.low
    if dist.kind == "tiers":
        weights = dist.weights or [1.0] * len(dist.values)
        return min(v for v, w in zip(dist.values, weights, strict=True) if w > 0)
    return None


@dataclass(frozen=True, eq=False)
class Devices:
    """Per-client profiles, float64 arrays [N] indexed by client id."""

    step_s: np.ndarray  # seconds per local step
    up_bps: np.ndarray  # upload bytes per second
    down_bps: np.ndarray  # download bytes per second
    latency_s: np.ndarray  # fixed per-task overhead (round-trip latency)

    @property
    def num_clients(self) -> int:
        return int(self.step_s.size)

    def compute_time(self, ids: np.ndarray, steps: int | np.ndarray) -> np.ndarray:
        """steps * step_s for clients `ids` (steps: one count, or one per id)."""
        return np.asarray(steps, dtype=np.float64) * self.step_s[np.asarray(ids, dtype=np.int64)]

    def task_time(self, ids: np.ndarray, steps: int | np.ndarray, down_bytes: float | np.ndarray,
                  up_bytes: float | np.ndarray) -> np.ndarray:
        """latency + down_bytes / down_bps + steps * step_s + up_bytes / up_bps per id
        (bytes: one size, or one per id; 0 up_bytes for a client that never uploads)."""
        ids = np.asarray(ids, dtype=np.int64)
        transfer = (np.asarray(down_bytes, dtype=np.float64) / self.down_bps[ids]
                    + np.asarray(up_bytes, dtype=np.float64) / self.up_bps[ids])
        return self.latency_s[ids] + transfer + self.compute_time(ids, steps)


def build_devices(cfg: DevicesConfig, n: int, seeds: SeedTree) -> Devices:
    """Profiles for clients 0..n-1: read from `cfg.path`, else each quantity drawn from its own
    stream `devices.<quantity>`."""
    if cfg.path is not None:
        columns = read_columns(cfg.path, "devices.path", ("client_id", *QUANTITIES))
        return _devices_from_columns(columns, n, f"devices.path: {cfg.path}")
    for name in QUANTITIES:
        check_distribution(getattr(cfg, name), f"devices.{name}")
        low = smallest_value(getattr(cfg, name))
        if low is not None and (low <= 0 if name in BANDWIDTHS else low < 0):
            bound = "> 0" if name in BANDWIDTHS else ">= 0"
            raise ConfigError(f"devices.{name}: values must be {bound}; this distribution "
                              f"can yield {low}")
    return Devices(**{name: draw(getattr(cfg, name), n, seeds.rng(f"devices.{name}"),
                                 f"devices.{name}") for name in QUANTITIES})


def _devices_from_columns(columns: dict[str, np.ndarray], n: int, where: str) -> Devices:
    """Check that the ids are exactly 0..n-1 and the values valid; order rows by id."""
    order = check_client_ids(columns["client_id"], n, where, exactly_once=True)
    values = {name: columns[name].astype(np.float64)[order] for name in QUANTITIES}
    for name, col in values.items():
        bad = ~np.isfinite(col) | (col <= 0 if name in BANDWIDTHS else col < 0)
        if bad.any():
            bound = "> 0" if name in BANDWIDTHS else ">= 0"
            raise ConfigError(f"{where}: {name} must be finite and {bound} (client "
                              f"{int(np.flatnonzero(bad)[0])} has {col[bad][0]})")
    return Devices(**values)


def check_client_ids(ids: np.ndarray, n: int, where: str, exactly_once: bool) -> np.ndarray:
    """Validate a client_id column against [0, n) and return the row order sorting it
    (with exactly_once, every id must appear once)."""
    ids_f = np.asarray(ids, dtype=np.float64)
    if not np.all(np.isfinite(ids_f) & (ids_f == np.floor(ids_f))):
        raise ConfigError(f"{where}: client_id must hold whole numbers")
    out = (ids_f < 0) | (ids_f >= n)
    if out.any():
        raise ConfigError(f"{where}: client_id {int(ids_f[out][0])} is out of range [0, {n})")
    ids_i = ids_f.astype(np.int64)
    if exactly_once:
        counts = np.bincount(ids_i, minlength=n)
        if (counts > 1).any():
            raise ConfigError(f"{where}: duplicate client ids {_first(np.flatnonzero(counts > 1))}")
        if (counts == 0).any():
            raise ConfigError(f"{where}: missing client ids {_first(np.flatnonzero(counts == 0))} "
                              f"(needs each of 0..{n - 1} once)")
    return np.argsort(ids_i, kind="stable")


def _first(ids: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:k])
    return shown + (f", ... ({ids.size} in all)" if ids.size > k else "")


def read_columns(path: str, key: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Columns `names` of a Parquet (.parquet, .pq) or CSV (.csv) file as numpy arrays; any
    problem is a one-line ConfigError naming `key`."""
    file = Path(path)
    readers = {".parquet": pq.read_table, ".pq": pq.read_table, ".csv": pa_csv.read_csv}
    if file.suffix.lower() not in readers:
        raise ConfigError(f"{key}: {path} must end in .parquet, .pq or .csv")
    if not file.is_file():
        raise ConfigError(f"{key}: {path} not found")
    try:
        table = readers[file.suffix.lower()](file)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{key}: cannot read {path}: {_one_line(err)}") from None
    missing = [name for name in names if name not in table.column_names]
    if missing:
        raise ConfigError(f"{key}: {path} lacks column(s) {', '.join(missing)} "
                          f"(needs {', '.join(names)})")
    bad = [name for name in names if not _is_numeric(table.column(name).type)]
    if bad:
        raise ConfigError(f"{key}: {path} column {bad[0]} is not numeric "
                          f"({table.column(bad[0]).type})")
    return {name: table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
            for name in names}  # nulls become NaN, caught by the range checks


def _one_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_null(dtype)
