"""Device profiles: each client's compute speed, bandwidths and latency, drawn once per run.

A quantity is a distribution (scenarios/distributions.py: constant, uniform, lognormal, Pareto
or discrete tiers) drawn with its own seeded stream, or a column of a Parquet/CSV file
(`devices.path`). A client's task time is latency + down_bytes / down_bps + steps * step_s +
up_bytes / up_bps (the usual compute-plus-communication model of system heterogeneity, as in
FedScale: Lai et al., 2022).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from scenarios.distributions import Distribution, check_low

QUANTITIES = ("step_s", "up_bps", "down_bps", "latency_s")
BANDWIDTHS = ("up_bps", "down_bps")


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


def build_devices(quantities: Mapping[str, Distribution], path: str | None, n: int,
                  seeds: SeedTree) -> Devices:
    """Profiles for clients 0..n-1: read from the file at `path`, else each quantity drawn
    from its distribution with its own stream `devices.<quantity>`."""
    if path is not None:
        columns = read_columns(path, "devices.path", ("client_id", *QUANTITIES))
        return _devices_from_columns(columns, n, f"devices.path: {path}")
    for name in QUANTITIES:
        check_low(quantities[name], f"devices.{name}", strictly_positive=name in BANDWIDTHS)
    return Devices(**{name: quantities[name].draw(n, seeds.rng(f"devices.{name}"))
                      for name in QUANTITIES})


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
        raise ConfigError(f"{key}: cannot read {path}: {first_line(err)}") from None
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


def first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_null(dtype)
