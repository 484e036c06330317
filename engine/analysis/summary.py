"""Analysis of the Parquet logs (no Ray, no engine state).

A per-run summary (accuracy, rounds and virtual time to a target accuracy, bytes, consensus
distance, how the run ended), keys that name a summary column or a dotted path into each run's
stored config (so a sweep's parameters and any config value can group or filter runs), group-by
with mean and sample std over the remaining runs (seeds), output as a terminal table, CSV or
Markdown, and SQL over the whole dataset through DuckDB. PNG plots live in engine/analysis/plots.py.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from engine.core.config import parse_override
from engine.core.errors import ConfigError
from engine.records.logs import SCHEMAS, read_table

DEFAULT_TARGET = 0.8
DEFAULT_METRICS = ("final_accuracy", "best_accuracy", "consensus_dist", "rounds_to_target",
                   "wall_s")
ID_COLUMNS = ("run_id", "experiment", "seed", "policy", "attack")
_STAGE_KEYS = ("aggregation", "consensus")  # keys resolved to the policy column's short label
_MISSING = object()  # a config path absent from a run (distinct from a null value)
_KEEP_NULLS = pc.ScalarAggregateOptions(skip_nulls=False)  # "first"/"last" row, null or not


class Runs(NamedTuple):
    """The per-run summary (one row per run), each run's stored config parsed (config-path keys
    read it), and the sweep's swept columns (constant columns of the runs table)."""

    summary: pa.Table
    configs: list[dict[str, Any]]
    swept: list[str]


class Filter(NamedTuple):
    """`--filter key=value`: value parsed as YAML (64 -> int), text kept for string matches."""

    key: str
    value: Any
    text: str


def summarize(log_dir: Path, target: float = DEFAULT_TARGET) -> pa.Table:
    """One row per run: final/best test accuracy (of the global model, or of the peers'
    average), rounds done, wall time, client- (peer-) updates/s; for decentralized runs also
    the last consensus distance and the spread of the last evaluated peers' accuracy; rounds
    and virtual time to `target` accuracy, bytes communicated, and how the run ended."""
    return load_runs(log_dir, target).summary


def load_runs(log_dir: Path, target: float = DEFAULT_TARGET) -> Runs:
    """The summary of every run under `log_dir`, with the runs' parsed configs."""
    log_dir = Path(log_dir)
    runs = read_table(log_dir, "runs", constants=True)
    if runs.num_rows == 0:
        raise ConfigError(f"{log_dir}: no runs found (expected {log_dir}/runs/run_id=*/*.parquet)")
    swept = [c for c in runs.column_names if c not in SCHEMAS["runs"].names and c != "run_id"]
    rounds = read_table(log_dir, "rounds")
    table = runs.select(["run_id", "experiment", *swept, "seed", "backend", "num_pools",
                         "rounds_planned", "started_at", "config_yaml"])
    for part in (_progress(rounds), _accuracy(rounds), _returns(rounds),
                 _to_target(rounds, target), _outcomes(read_table(log_dir, "outcomes"))):
        table = table.join(part, "run_id", join_type="left outer")
    table = table.sort_by([("started_at", "ascending"), ("run_id", "ascending")])
    configs = [yaml.safe_load(text) or {} for text in table["config_yaml"].to_pylist()]
    return Runs(_summary_columns(table, swept, configs), configs, swept)


def _by_round(rounds: pa.Table) -> pa.Table:
    return rounds.sort_by([("run_id", "ascending"), ("round", "ascending")])


def _progress(rounds: pa.Table) -> pa.Table:
    return _by_round(rounds).group_by("run_id", use_threads=False).aggregate(
        [("round", "count"), ("wall_time_s", "max"), ("num_updates", "sum"),
         ("consensus_distance", "last"), ("bytes_communicated", "sum")])


def _accuracy(rounds: pa.Table) -> pa.Table:
    evaluated = _by_round(rounds.filter(pc.is_valid(rounds["test_accuracy"])))
    return evaluated.group_by("run_id", use_threads=False).aggregate(
        [("test_accuracy", "last"), ("test_accuracy", "max"), ("peer_accuracy_min", "last"),
         ("peer_accuracy_max", "last")])


def _returns(rounds: pa.Table) -> pa.Table:
    """Tasks learnt by acting: the last and best evaluated mean test return."""
    evaluated = _by_round(rounds.filter(pc.is_valid(rounds["test_return"])))
    return evaluated.group_by("run_id", use_threads=False).aggregate(
        [("test_return", "last"), ("test_return", "max")])


def _to_target(rounds: pa.Table, target: float) -> pa.Table:
    """The first round reaching `target` test accuracy (as rounds done) and its virtual time."""
    reached = _by_round(rounds.filter(pc.greater_equal(rounds["test_accuracy"], target)))
    first = reached.group_by("run_id", use_threads=False).aggregate(
        [("round", "first"), ("virtual_time", "first", _KEEP_NULLS)])
    return pa.table({"run_id": first["run_id"],
                     "rounds_to_target": pc.add(pc.cast(first["round_first"], pa.int64()), 1),
                     "vtime_to_target": first["virtual_time_first"]})


def _outcomes(outcomes: pa.Table) -> pa.Table:
    """Each run's last outcome row (a run with none is still running, or was killed)."""
    ordered = outcomes.sort_by([("run_id", "ascending"), ("finished_at", "ascending")])
    last = ordered.group_by("run_id", use_threads=False).aggregate(
        [("status", "last", _KEEP_NULLS),
         ("error", "last", _KEEP_NULLS)])
    return pa.table({"run_id": last["run_id"], "status": last["status_last"],
                     "error": last["error_last"]})


def _summary_columns(table: pa.Table, swept: list[str], configs: list[dict]) -> pa.Table:
    wall = table["wall_time_s_max"]
    return pa.table({
        **{c: table[c] for c in ["run_id", "experiment", *swept, "seed"]},
        **_policy_labels(configs),
        **{c: table[c] for c in ["backend", "num_pools"]},
        "rounds": table["round_count"], "rounds_planned": table["rounds_planned"],
        "final_accuracy": table["test_accuracy_last"], "best_accuracy": table["test_accuracy_max"],
        **({"final_return": table["test_return_last"], "best_return": table["test_return_max"]}
           if table["test_return_last"].null_count < table.num_rows else {}),  # RL runs only
        "consensus_dist": table["consensus_distance_last"],
        "peer_acc_min": table["peer_accuracy_min_last"],
        "peer_acc_max": table["peer_accuracy_max_last"],
        "wall_s": wall, "updates_per_s": pc.divide(pc.cast(table["num_updates_sum"], pa.float64()),
                                                   wall),
        "rounds_to_target": table["rounds_to_target"],
        "vtime_to_target": table["vtime_to_target"],
        "bytes": table["bytes_communicated_sum"],
        "status": pc.fill_null(table["status"], "incomplete"), "error": table["error"],
    })


def _stage_label(stages: list) -> str:
    """A policy chain's short label: its stage names joined by '+'."""
    return "+".join(next(iter(s)) if isinstance(s, dict) else str(s) for s in stages)


def _policy_labels(configs: list[dict]) -> dict[str, list[str]]:
    """Short labels of each run's policy (aggregation chain, or consensus on a topology for
    decentralized runs) and attack, read from its stored config."""
    policy, attack = [], []
    for cfg in configs:
        if cfg.get("mode") == "decentralized":
            async_ = "async " if cfg["gossip"]["mode"] == "async" else ""
            policy.append(f"{async_}{next(iter(cfg['consensus'][0]))}@{cfg['topology']['kind']}")
        else:
            policy.append(_stage_label(cfg.get("aggregation", [])))
        a = cfg.get("attack", {"kind": "none"})
        attack.append("none" if a["kind"] == "none" else f"{a['kind']}@{a['fraction']:g}")
    return {"policy": policy, "attack": attack}


# ---- keys: a summary column, else a dotted path into each run's stored config ----

def key_values(runs: Runs, key: str) -> list[Any]:
    """One value per run for `key`: a summary column (a swept column falls back to the config
    where a run has none), else a dotted config path; lists and dicts as compact strings."""
    columns = runs.summary.column_names
    if key in columns and key not in runs.swept:
        return runs.summary[key].to_pylist()
    column = runs.summary[key].to_pylist() if key in columns else [None] * runs.summary.num_rows
    pairs = zip(column, runs.configs, strict=True)
    found = [_config_value(cfg, key) if v is None else v for v, cfg in pairs]
    if key not in columns and all(v is _MISSING for v in found):
        raise ConfigError(f"unknown key '{key}': not in any run's config nor a summary column "
                          f"({', '.join(columns)})")
    return [None if v is _MISSING else _scalar(v) for v in found]


def _config_value(cfg: dict, key: str) -> Any:
    if key in _STAGE_KEYS:
        return _MISSING if cfg.get(key) is None else _stage_label(cfg[key])
    if key == "attack.kind":
        return cfg.get("attack", {}).get("kind", "none")
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _scalar(value: Any) -> Any:
    """Lists and dicts as compact (YAML flow) strings, so that values hash and print."""
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return value


def value_order(value: Any) -> tuple:
    """A sort key for mixed values: numbers, then strings, then nulls."""
    return (value is None, isinstance(value, str), 0 if value is None else value)


def groups(runs: Runs, keys: Sequence[str]) -> dict[tuple, list[int]]:
    """Row indices of the runs sharing each combination of the keys' values, sorted by key."""
    columns = [key_values(runs, k) for k in keys]
    found: dict[tuple, list[int]] = {}
    for i, values in enumerate(zip(*columns, strict=True) if columns else []):
        found.setdefault(values, []).append(i)
    return {v: found[v] for v in sorted(found, key=lambda vs: tuple(map(value_order, vs)))}


def group_label(keys: Sequence[str], values: Sequence[Any]) -> str:
    """`topology.kind=ring, peers=16`."""
    return ", ".join(f"{k}={'-' if v is None else v}" for k, v in zip(keys, values, strict=True))


# ---- filters ----

def parse_filter(text: str) -> Filter:
    """`key=value` -> Filter, the value parsed as YAML (64 -> int, 0.1 -> float)."""
    try:
        path, value = parse_override(text)
    except ConfigError:
        raise ConfigError(f"--filter {text!r}: expected key=value") from None
    return Filter(".".join(path), value, text.partition("=")[2].strip())


def _matches(value: Any, wanted: Filter) -> bool:
    if value == wanted.value or str(value) == wanted.text:
        return True
    if isinstance(value, str) and isinstance(wanted.value, list | dict):
        try:  # a swept list (a chain of stages) is stored as its JSON text
            return yaml.safe_load(value) == wanted.value
        except yaml.YAMLError:
            return False
    return False


def filter_runs(runs: Runs, filters: Iterable[Filter]) -> Runs:
    """The runs whose every filter key equals its value (compared as values, else as text)."""
    filters = list(filters)
    keep = np.ones(runs.summary.num_rows, dtype=bool)
    for f in filters:
        keep &= np.array([_matches(v, f) for v in key_values(runs, f.key)], dtype=bool)
    if not keep.any():
        wanted = " ".join(f"{f.key}={f.text}" for f in filters)
        raise ConfigError(f"--filter {wanted}: no run matches")
    configs = [cfg for cfg, k in zip(runs.configs, keep, strict=True) if k]
    return Runs(runs.summary.filter(pa.array(keep)), configs, runs.swept)


# ---- group-by ----

def check_metrics(summary: pa.Table, metrics: Sequence[str]) -> None:
    """Metrics must be numeric summary columns."""
    numeric = [f.name for f in summary.schema
               if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
    for m in metrics:
        if m not in numeric:
            raise ConfigError(f"--metric: unknown metric '{m}' (numeric summary columns: "
                              f"{', '.join(numeric)})")


def metric_values(summary: pa.Table, metric: str) -> np.ndarray:
    """A summary column as float64, NaN for nulls."""
    return pc.cast(summary[metric], pa.float64()).to_numpy(zero_copy_only=False)


def mean_std(values: np.ndarray) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1) of the non-NaN values; None where undefined."""
    valid = values[~np.isnan(values)]
    mean = float(valid.mean()) if valid.size else None
    return mean, float(valid.std(ddof=1)) if valid.size > 1 else None


def group_by(runs: Runs, keys: Sequence[str],
             metrics: Sequence[str] = DEFAULT_METRICS) -> pa.Table:
    """One row per combination of the keys' values: the keys, the number of runs, and each
    metric's mean and sample std over those runs (nulls ignored)."""
    check_metrics(runs.summary, metrics)
    found = groups(runs, keys)
    columns = {k: _column([values[i] for values in found]) for i, k in enumerate(keys)}
    columns["runs"] = pa.array([len(rows) for rows in found.values()], pa.int64())
    for m in metrics:
        values = metric_values(runs.summary, m)
        stats = [mean_std(values[rows]) for rows in found.values()]
        columns[f"{m}_mean"] = pa.array([s[0] for s in stats], pa.float64())
        columns[f"{m}_std"] = pa.array([s[1] for s in stats], pa.float64())
    return pa.table(columns)


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types: as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def select_metrics(runs: Runs, metrics: Sequence[str]) -> pa.Table:
    """The summary narrowed to the runs' identity columns and the chosen metrics."""
    check_metrics(runs.summary, metrics)
    names = [c for c in runs.summary.column_names if c in ID_COLUMNS or c in runs.swept]
    return runs.summary.select([*names, *(m for m in metrics if m not in names)])


# ---- output formats ----

def format_table(table: pa.Table) -> str:
    """A fixed-width terminal table; floats to 3 significant decimals, nulls as '-'."""
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    header = list(table.column_names)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_csv(table: pa.Table) -> str:
    """CSV with a header row; full-precision numbers, nulls as empty fields."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.column_names)
    for row in table.to_pylist():
        writer.writerow(["" if v is None else v for v in row.values()])
    return out.getvalue().rstrip("\n")


def format_markdown(table: pa.Table) -> str:
    """A GitHub pipe table (numbers right-aligned), cells formatted as in the terminal table."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]
    rule = ["---:" if n else "---" for n in numeric]
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    return "\n".join([line(table.column_names), line(rule), *map(line, rows)])


FORMATS: dict[str, Callable[[pa.Table], str]] = {
    "table": format_table, "csv": format_csv, "markdown": format_markdown}


def render(table: pa.Table, fmt: str = "table") -> str:
    """`table` as text in one of FORMATS."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: unknown format '{fmt}' (one of {', '.join(FORMATS)})")
    return FORMATS[fmt](table)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:.3g}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


# ---- SQL ----

def query(log_dir: Path, sql: str) -> pa.Table:
    """Run `sql` through DuckDB over views named after the tables present under `log_dir`
    (runs, rounds, clients, peers, outcomes; run_id from the hive partition)."""
    try:
        import duckdb
    except ImportError:
        raise ConfigError("--sql needs duckdb (pip install duckdb)") from None
    con = duckdb.connect()
    try:
        for name in SCHEMAS:
            if any((Path(log_dir) / name).glob("*/*.parquet")):
                pattern = str(Path(log_dir) / name / "*" / "*.parquet").replace("'", "''")
                con.execute(f"create view {name} as select * from read_parquet('{pattern}', "
                            "hive_partitioning=true, union_by_name=true, "
                            "hive_types={'run_id': VARCHAR})")
        result = con.sql(sql)
        return pa.table({}) if result is None else result.to_arrow_table()
    except duckdb.Error as err:
        raise ConfigError(f"--sql: {str(err).splitlines()[0]}") from None
    finally:
        con.close()
