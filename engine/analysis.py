"""Per-run summaries read back from the Parquet logs (no Ray, no engine state)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from engine.config import ConfigError
from engine.logs import read_table

SUMMARY_COLUMNS = ["run_id", "experiment", "aggregation", "attack", "backend", "num_pools",
                   "rounds", "rounds_planned", "final_accuracy", "best_accuracy", "wall_s",
                   "updates_per_s"]


def _policy_labels(config_yaml: pa.ChunkedArray) -> dict[str, list[str]]:
    """Short labels of each run's aggregation chain and attack, read from its stored config."""
    aggregation, attack = [], []
    for text in config_yaml.to_pylist():
        cfg = yaml.safe_load(text)
        stages = [next(iter(stage)) for stage in cfg.get("aggregation", [])]
        aggregation.append("+".join(stages))
        a = cfg.get("attack", {"kind": "none"})
        attack.append("none" if a["kind"] == "none" else f"{a['kind']}@{a['fraction']:g}")
    return {"aggregation": aggregation, "attack": attack}


def summarize(log_dir: Path) -> pa.Table:
    """One row per run: final/best test accuracy, rounds done, wall time, client-updates/s."""
    log_dir = Path(log_dir)
    runs = read_table(log_dir, "runs")
    if runs.num_rows == 0:
        raise ConfigError(f"{log_dir}: no runs found (expected {log_dir}/runs/run_id=*/*.parquet)")
    rounds = read_table(log_dir, "rounds")
    evaluated = rounds.filter(pc.is_valid(rounds["test_accuracy"])).sort_by(
        [("run_id", "ascending"), ("round", "ascending")])
    accuracy = evaluated.group_by("run_id", use_threads=False).aggregate(
        [("test_accuracy", "last"), ("test_accuracy", "max")])
    progress = rounds.group_by("run_id").aggregate(
        [("round", "count"), ("wall_time_s", "max"), ("num_updates", "sum")])
    table = (runs.select(["run_id", "experiment", "backend", "num_pools", "rounds_planned",
                          "started_at", "config_yaml"])
             .join(progress, "run_id", join_type="left outer")
             .join(accuracy, "run_id", join_type="left outer")
             .sort_by("started_at"))
    wall = table["wall_time_s_max"]
    return pa.table({
        **{c: table[c] for c in ["run_id", "experiment"]},
        **_policy_labels(table["config_yaml"]),
        **{c: table[c] for c in ["backend", "num_pools"]},
        "rounds": table["round_count"], "rounds_planned": table["rounds_planned"],
        "final_accuracy": table["test_accuracy_last"], "best_accuracy": table["test_accuracy_max"],
        "wall_s": wall, "updates_per_s": pc.divide(pc.cast(table["num_updates_sum"], pa.float64()),
                                                   wall),
    })


def format_table(table: pa.Table) -> str:
    """A fixed-width terminal table; floats to 3 significant decimals, nulls as '-'."""
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    header = list(table.column_names)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)
