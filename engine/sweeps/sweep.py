"""Sweep files: a base scenario plus grid / zip / random axes and seeds -> a list of runs.

    base: ../gossip_ring.yaml          # relative to the sweep file
    experiment: topologies              # logs/<experiment>/ (default: the sweep file's name)
    set: {rounds: 30}                   # fixed overrides of the base, for every run
    names: {peers: population.num_clients}   # short column names for dotted keys
    grid: {topology.kind: [ring, torus], peers: [16, 64]}      # cartesian product
    zip: {training.lr: [0.1, 0.05], training.batch_size: [16, 32]}   # paired lists
    random: {samples: 4, seed: 0, params: {training.lr: {loguniform: [0.01, 0.3]}}}
    seeds: 3                            # or a list; seeds are the innermost axis
    cpus_per_run: 1

Every axis is a dotted config key (or a name for one). A run's id is a hash of its resolved
config and its swept values, so the same sweep file always names the same runs: a rerun skips
the finished ones. The swept values become typed columns of every table the run logs. Pure:
no Ray; configs are resolved (engine/resolve.py) to check every run.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.core.config import (
    EXPERIMENT_NAME,
    ExperimentConfig,
    apply_override,
    build_config,
    parse_override,
    read_yaml,
)
from engine.core.errors import ConfigError
from engine.records.logs import SCHEMAS, read_table
from engine.resolve import CATALOG, described, resolve


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Distribution = dict[Literal["uniform", "loguniform", "int", "choice"], list[Any]]


class RandomAxes(_Strict):
    """`samples` points, each key drawn independently: uniform / loguniform over [lo, hi],
    int uniform over lo..hi inclusive, or a choice from a list."""

    samples: int = Field(ge=1)
    seed: int = Field(0, ge=0)
    params: dict[str, Annotated[Distribution, Field(min_length=1, max_length=1)]]


class SweepSpec(_Strict):
    base: str
    experiment: str | None = Field(None, pattern=EXPERIMENT_NAME, max_length=100)
    set: dict[str, Any] = {}
    names: dict[str, str] = {}
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    zip: dict[str, Annotated[list[Any], Field(min_length=1)]] = {}
    random: RandomAxes | None = None
    seeds: int | Annotated[list[int], Field(min_length=1)] | None = None
    cpus_per_run: int = Field(1, ge=1)


@dataclass(frozen=True)
class RunSpec:
    run_id: str
    config: ExperimentConfig
    params: dict[str, Any]  # column -> swept value (as written in the sweep)
    constants: dict[str, pa.Scalar]  # the same, typed for the logs
    refused: str | None = None  # the engine's one-line reason, when it refuses the run
    notes: tuple[str, ...] = ()  # what the engine says at start (a reduction to another rule)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(frozen=True)
class Sweep:
    experiment: str
    runs: list[RunSpec]
    cpus_per_run: int
    columns: dict[str, str]  # column -> dotted config key

    @property
    def refused(self) -> list[RunSpec]:
        return [run for run in self.runs if run.refused is not None]

    def check(self) -> None:
        """Refuse the whole sweep, before anything runs, if the engine refuses any run: one
        line naming the first (`--dry-run` lists every one)."""
        refused = self.refused
        if refused:
            more = f" (and {len(refused) - 1} more refused runs; --dry-run lists them)" \
                if len(refused) > 1 else ""
            raise ConfigError(f"sweep run [{refused[0].label()}]: {refused[0].refused}{more}")


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read and expand a sweep file; `overrides` (key=value) apply to the base of every run.
    Every run is checked here, before anything runs, as the engine prepares it (its task and
    world built, no pools): a run the engine refuses carries the reason (`Sweep.check`)."""
    path = Path(path)
    spec = _spec(read_yaml(path), path)
    base = read_yaml((path.parent / spec.base).resolve())
    experiment = spec.experiment or path.stem
    for key, value in spec.set.items():
        apply_override(base, key.split("."), value, CATALOG)
    for text in overrides:
        apply_override(base, *parse_override(text), CATALOG)
    base["experiment"] = experiment
    columns = _columns(spec)
    points = _points(spec, base)
    types = {c: _arrow_type([p[c] for p in points]) for c in columns}
    runs = _unique([_run(base, columns, types, point) for point in points])
    return Sweep(experiment, runs, spec.cpus_per_run, columns)


def _spec(raw: dict[str, Any], path: Path) -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return _fail(f"{path}: {loc or 'sweep'}: {first['msg']}")


def _fail(message: str):
    raise ConfigError(message)


def _columns(spec: SweepSpec) -> dict[str, str]:
    """column -> dotted key, in axis order (grid, zip, random, seed)."""
    axes = [*spec.grid, *spec.zip, *(spec.random.params if spec.random else {}), "seed"]
    if len(set(axes)) != len(axes):
        _fail(f"sweep: a key is swept on more than one axis: {sorted(axes)}")
    reserved = {f.name for schema in SCHEMAS.values() for f in schema} | {"run_id"}
    for column in axes:
        key = spec.names.get(column, column)
        if column != "seed" and (column in reserved or key in ("seed", "experiment")):
            _fail(f"sweep: cannot sweep {column!r} (a log column name, or set by the sweep)")
    return {c: spec.names.get(c, c) for c in axes}


def _points(spec: SweepSpec, base: dict[str, Any]) -> list[dict[str, Any]]:
    grid = [dict(zip(spec.grid, values, strict=True))
            for values in itertools.product(*spec.grid.values())]
    zipped = _zipped(spec.zip)
    drawn = _drawn(spec.random)
    seeds = _seeds(spec.seeds, base)
    return [{**g, **z, **d, "seed": s}
            for g, z, d in itertools.product(grid, zipped, drawn) for s in seeds]


def _zipped(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    lengths = {len(v) for v in axes.values()}
    if len(lengths) > 1:
        _fail(f"sweep: zip lists must have equal lengths (got {[len(v) for v in axes.values()]})")
    return [dict(zip(axes, values, strict=True)) for values in zip(*axes.values(), strict=True)] \
        if axes else [{}]


def _drawn(axes: RandomAxes | None) -> list[dict[str, Any]]:
    """The random axis: `samples` points from a generator seeded by the sweep file alone."""
    if axes is None:
        return [{}]
    rng = np.random.default_rng(axes.seed)
    return [{key: _draw(key, dist, rng) for key, dist in axes.params.items()}
            for _ in range(axes.samples)]


def _draw(key: str, dist: Distribution, rng: np.random.Generator) -> Any:
    (kind, args), = dist.items()
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    if len(args) != 2 or not all(isinstance(a, int | float) for a in args) or args[0] > args[1]:
        _fail(f"sweep: random.params.{key}.{kind}: expected [low, high] numbers (got {args})")
    lo, hi = args
    if kind == "int":
        return int(rng.integers(int(lo), int(hi) + 1))
    if kind == "loguniform":
        if lo <= 0:
            _fail(f"sweep: random.params.{key}.loguniform: bounds must be > 0 (got {args})")
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


def _seeds(seeds: int | list[int] | None, base: dict[str, Any]) -> list[int]:
    if seeds is None:
        return [int(base.get("seed", 0))]
    return list(range(seeds)) if isinstance(seeds, int) else list(seeds)


def _run(base: dict[str, Any], columns: dict[str, str], types: dict[str, pa.DataType],
         point: dict[str, Any]) -> RunSpec:
    raw = copy.deepcopy(base)
    for column, value in point.items():
        apply_override(raw, columns[column].split("."), value, CATALOG)
    from engine.experiment import prepare

    label = " ".join(f"{k}={v}" for k, v in point.items())
    try:
        cfg = build_config(raw)  # a malformed point is a bad sweep file
    except ConfigError as err:
        raise ConfigError(f"sweep run [{label}]: {err}") from None
    blob = json.dumps([cfg.to_dict(), point], sort_keys=True, default=str).encode()
    constants = {c: pa.scalar(_cast(point[c], types[c]), types[c]) for c in point}
    try:
        resolve(cfg)
        blob = json.dumps([described(cfg), point], sort_keys=True, default=str).encode()
        notes = prepare(cfg).mode.notes
    except ConfigError as err:  # a run the engine refuses
        return RunSpec(hashlib.sha256(blob).hexdigest()[:16], cfg, point, constants, str(err))
    return RunSpec(hashlib.sha256(blob).hexdigest()[:16], cfg, point, constants, notes=notes)


def _arrow_type(values: list[Any]) -> pa.DataType:
    """One type per column for the whole sweep, so every run's files agree."""
    if all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pa.int64()
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return pa.float64()
    return pa.string()


def _cast(value: Any, kind: pa.DataType) -> Any:
    if kind == pa.string():
        return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return float(value) if kind == pa.float64() else value


def _unique(runs: list[RunSpec]) -> list[RunSpec]:
    """Points drawn twice (random choices) are one run: the same config gives the same
    results."""
    return list({run.run_id: run for run in runs}.values())


# -- what is left to run ----------------------------------------------------------------

def finished_runs(log_dir: Path) -> dict[str, str]:
    """run_id -> last recorded outcome (completed | failed | interrupted) of runs under
    log_dir."""
    table = read_table(log_dir, "outcomes").sort_by("finished_at")
    return dict(zip(table["run_id"].to_pylist(), table["status"].to_pylist(), strict=True))


def pending(sweep: Sweep, log_dir: Path, retry_failed: bool = False) -> list[RunSpec]:
    """The sweep's runs without a completed or diverged outcome (nor a failed one, unless
    retried)."""
    done = {"completed", "diverged"} | (set() if retry_failed else {"failed"})
    outcomes = finished_runs(log_dir)
    return [run for run in sweep.runs if outcomes.get(run.run_id) not in done]
