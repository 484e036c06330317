"""PNG curves and heatmaps of the logged runs.

The data behind each figure comes from a pure function (`curves`, `heatmap`) that tests check
with hand-computed numbers; `draw_curves` / `draw_heatmap` only render it, on a bare
matplotlib `Figure` (Agg canvas, no pyplot state, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

from engine.analysis.summary import (
    Runs,
    check_metrics,
    group_label,
    groups,
    mean_std,
    metric_values,
    value_order,
)
from engine.core.errors import ConfigError
from engine.records.logs import ROUNDS, read_table

METRIC_ALIASES = {"accuracy": "test_accuracy", "loss": "train_loss",
                  "consensus": "consensus_distance", "peer_accuracy": "peer_accuracy_mean"}
X_AXES = {"round": "round", "virtual_time": "virtual_time", "wall_time": "wall_time_s"}


class PlotSpec(NamedTuple):
    """`--plot METRIC:X` as written (for the file name) and as rounds columns."""

    metric: str
    x: str
    metric_column: str
    x_column: str


class Curve(NamedTuple):
    """One line: a group's metric at each round, averaged over the group's runs."""

    label: str
    x: np.ndarray  # the round, or the mean virtual/wall time of the runs at that round
    mean: np.ndarray
    std: np.ndarray  # sample std over the runs; NaN where fewer than two
    runs: np.ndarray  # runs averaged at each point


class Heatmap(NamedTuple):
    """A metric's mean over the runs of each (row key value, column key value); NaN if none."""

    rows: list[str]
    cols: list[str]
    values: np.ndarray  # [len(rows), len(cols)]


def parse_plot(text: str) -> PlotSpec:
    """`accuracy:round` -> PlotSpec (metric: a rounds column or alias; x: an X_AXES key)."""
    metric, sep, x = text.partition(":")
    column = METRIC_ALIASES.get(metric, metric)
    numeric = [f.name for f in ROUNDS if pa.types.is_integer(f.type) or
               pa.types.is_floating(f.type)]
    if not sep or column not in numeric or column == "round":
        names = ", ".join([*METRIC_ALIASES, *numeric[1:]])
        raise ConfigError(f"--plot {text!r}: expected METRIC:X with METRIC one of {names}")
    if x not in X_AXES:
        raise ConfigError(f"--plot {text!r}: unknown x '{x}' (one of {', '.join(X_AXES)})")
    return PlotSpec(metric, x, column, X_AXES[x])


def curves(runs: Runs, rounds: pa.Table, spec: PlotSpec, keys: Sequence[str] = ()) -> list[Curve]:
    """One curve per group of runs (by `keys`; default the swept columns, else each run), over
    the rounds where the metric and x are logged; groups with no such round are left out."""
    keys = list(keys) or runs.swept or ["run_id"]
    run_ids = runs.summary["run_id"].to_pylist()
    found = groups(runs, keys)
    group_of = {run_ids[i]: g for g, rows in enumerate(found.values()) for i in rows}
    stats = _round_stats(rounds, spec, group_of)
    result = []
    for g, values in enumerate(found):
        mine = stats.filter(pc.equal(stats["group"], g)).sort_by("round")
        if mine.num_rows:
            x, mean, std = (_floats(mine[c]) for c in ("x_mean", "y_mean", "y_stddev"))
            result.append(Curve(group_label(keys, values), x, mean, std,
                                mine["y_count"].to_numpy()))
    if not result:
        raise ConfigError(f"--plot {spec.metric}:{spec.x}: no run logs both {spec.metric_column} "
                          f"and {spec.x_column}")
    return result


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> NaN


def _round_stats(rounds: pa.Table, spec: PlotSpec, group_of: dict[str, int]) -> pa.Table:
    """Per (group, round): mean, sample std and count of the metric, and the mean x."""
    logged = pc.and_(pc.is_valid(rounds[spec.metric_column]), pc.is_valid(rounds[spec.x_column]))
    rows = rounds.filter(pc.and_(logged, pc.is_in(rounds["run_id"], pa.array(list(group_of),
                                                                              pa.string()))))
    table = pa.table({
        "group": pa.array([group_of[r] for r in rows["run_id"].to_pylist()], pa.int64()),
        "round": rows["round"],
        "y": pc.cast(rows[spec.metric_column], pa.float64()),
        "x": pc.cast(rows[spec.x_column], pa.float64())})
    return table.group_by(["group", "round"], use_threads=False).aggregate(
        [("y", "mean"), ("y", "stddev", pc.VarianceOptions(ddof=1)), ("y", "count"),
         ("x", "mean")])


_STYLES = ("-", "--", ":", "-.")
LONG_LABEL = 40  # characters: longer curve labels go in a legend under the axes


def draw_curves(found: Sequence[Curve], spec: PlotSpec) -> Figure:
    """One line per curve, with a mean +- std band where more than one run is averaged."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, c in enumerate(found):  # past 10 curves the colours repeat: vary the dashes
        (line,) = ax.plot(c.x, c.mean, label=c.label, marker="." if len(c.x) <= 30 else None,
                          linestyle=_STYLES[i // 10 % len(_STYLES)])
        band = c.runs > 1
        if band.any():
            std = np.nan_to_num(c.std)
            ax.fill_between(c.x, c.mean - std, c.mean + std, where=band, alpha=0.2,
                            color=line.get_color(), linewidth=0)
    ax.set_xlabel(spec.x_column)
    ax.set_ylabel(spec.metric_column)
    ax.grid(alpha=0.3)
    if max((len(c.label) for c in found), default=0) > LONG_LABEL:  # would cover the axes
        fig.legend(loc="outside lower center", fontsize="small")
    else:
        ax.legend(fontsize="small")
    return fig


def heatmap(runs: Runs, row_key: str, col_key: str, metric: str) -> Heatmap:
    """The mean of a summary metric over the runs (e.g. seeds) of each pair of key values."""
    check_metrics(runs.summary, [metric])
    values = metric_values(runs.summary, metric)
    found = groups(runs, [row_key, col_key])
    rows = list(dict.fromkeys(r for r, _ in found))  # groups() sorts by (row, col)
    cols = sorted(dict.fromkeys(c for _, c in found), key=value_order)
    matrix = np.full((len(rows), len(cols)), np.nan)
    for (r, c), members in found.items():
        mean, _ = mean_std(values[members])
        matrix[rows.index(r), cols.index(c)] = np.nan if mean is None else mean
    return Heatmap([_text(v) for v in rows], [_text(v) for v in cols], matrix)


def _text(value) -> str:
    return "-" if value is None else str(value)


def draw_heatmap(found: Heatmap, row_key: str, col_key: str, metric: str) -> Figure:
    """Cells coloured and annotated with the value; combinations without runs stay blank."""
    fig = Figure(figsize=(1.6 + 1.1 * len(found.cols), 1.4 + 0.6 * len(found.rows)),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(found.values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(found.cols)), found.cols, rotation=30, ha="right")
    ax.set_yticks(range(len(found.rows)), found.rows)
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    finite = found.values[np.isfinite(found.values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), value in np.ndenumerate(found.values):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize="small",
                    color="black" if value > middle else "white")
    fig.colorbar(image, ax=ax, label=metric)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path


def write_curves(log_dir: Path, runs: Runs, text: str, keys: Sequence[str], out: Path) -> Path:
    """`--plot METRIC:X` -> <out>/<METRIC>_vs_<X>.png."""
    spec = parse_plot(text)
    found = curves(runs, read_table(log_dir, "rounds"), spec, keys)
    return save_png(draw_curves(found, spec), Path(out) / f"{spec.metric}_vs_{spec.x}.png")


def write_heatmap(runs: Runs, keys: Sequence[str], metric: str, out: Path) -> Path:
    """`--heatmap K1,K2` -> <out>/heatmap_<metric>_<K1>_<K2>.png."""
    if len(keys) != 2:
        raise ConfigError(f"--heatmap {','.join(keys)}: expected two keys K1,K2")
    found = heatmap(runs, keys[0], keys[1], metric)
    name = f"heatmap_{metric}_{keys[0]}_{keys[1]}.png".replace("/", "_")
    return save_png(draw_heatmap(found, keys[0], keys[1], metric), Path(out) / name)
