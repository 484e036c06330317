"""analyze on a tiny hand-written dataset: summary, keys, filters, group-by, formats, curves,
heatmap and SQL equal numbers computed by hand (no training runs)."""

import csv
import io
import subprocess
import sys

import matplotlib.image
import numpy as np
import pyarrow as pa
import pytest
import yaml

from engine.analysis.plots import curves, draw_curves, heatmap, parse_plot, save_png, write_heatmap
from engine.analysis.summary import (
    Runs,
    filter_runs,
    group_by,
    key_values,
    load_runs,
    parse_filter,
    query,
    render,
)
from engine.core.errors import ConfigError
from engine.records.logs import RoundRows, RunLogger, RunRows, outcome_row, read_table
from tests.conftest import ROOT

NA = None  # not evaluated or not applicable: a null in the files
RING = {"mode": "federated", "aggregation": [{"fedavg": {}}], "training": {"lr": 0.1},
        "task": {"model": {"kind": "mlp", "hidden": [64]}}}
TORUS = {**RING, "aggregation": [{"clip": {"max_norm": 1.0}}, {"trimmed_mean": {}}],
         "attack": {"kind": "alie", "fraction": 0.2}}
# run id: (topology.kind, seed, accuracy per round, wall time per round, virtual time, outcome)
RUNS = {
    "r1": ("ring", 0, [NA, 0.6, NA, 0.8], [1, 2, 3, 4], [0.5, 1.0, 1.5, 2.0], "completed"),
    "r2": ("ring", 1, [NA, 0.7, NA, 0.9], [2, 3, 4, 5], [0.5, 1.0, 1.5, 2.0], "completed"),
    "r3": ("torus", 0, [NA, 0.5, NA, 0.7], [1, 2, 3, 4], [NA] * 4, "failed"),
    "r4": ("torus", 1, [NA, 0.85, NA, 0.75], [1, 2, 3, 4], [NA] * 4, None),  # no outcome
}
LR = {"r1": 0.1, "r2": 0.1, "r3": 0.1, "r4": 0.05}


def _run_row(config: dict, seed: int, minute: int) -> RunRows:
    def one(v):
        return np.array([v])
    started = np.datetime64(f"2026-01-01T00:{minute:02d}:00", "ms")
    return RunRows(one("fixture"), one(yaml.safe_dump(config)), one("digest"), one(seed),
                   one("federated"), one("inline"), one("vmap"), one(1), one(16), one(4),
                   one(100), one(started), one("{}"))


def _round_rows(accuracy, wall, vtime) -> RoundRows:
    n = len(accuracy)
    full = lambda v: np.full(n, v, dtype=float)  # noqa: E731
    return RoundRows(
        round=np.arange(n), num_selected=np.full(n, 4), num_updates=np.full(n, 4),
        num_byzantine=np.zeros(n, int), train_loss=full(0.5),
        test_loss=np.array(accuracy, dtype=object),
        test_accuracy=np.array(accuracy, dtype=object), mean_update_norm=full(1.0),
        round_wall_s=full(1.0),
        train_wall_s=full(0.5), aggregate_wall_s=full(0.1), eval_wall_s=full(0.1),
        wall_time_s=np.array(wall, float), client_updates_per_s=full(4.0),
        consensus_distance=np.array([0.4, 0.3, 0.2, 0.1]),
        peer_accuracy_mean=np.full(n, NA, dtype=object),
        peer_accuracy_min=np.full(n, NA, dtype=object),
        peer_accuracy_max=np.full(n, NA, dtype=object),
        gossip_messages=np.zeros(n, int), virtual_time=np.array(vtime, dtype=object),
        bytes_communicated=np.full(n, 100))


def _write_run(root, run_id, kind, seed, accuracy, wall, vtime, status, minute,
               constants=True):
    config = {**(RING if kind == "ring" else TORUS), "seed": seed,
              "topology": {"kind": kind}, "training": {"lr": LR.get(run_id, 0.1)}}
    swept = {"topology.kind": pa.scalar(kind), "seed": pa.scalar(seed, pa.int64())}
    log = RunLogger(root, run_id, flush_every_s=3600, constants=swept if constants else None)
    log.append(_run_row(config, seed, minute))
    log.append(_round_rows(accuracy, wall, vtime))
    if status:
        log.append(outcome_row(status, "RuntimeError: boom" if status == "failed" else None,
                               len(accuracy), float(wall[-1])))
    log.flush()


@pytest.fixture
def logs(tmp_path):
    """Two topology kinds x two seeds (a sweep); r3 failed, r4 has no outcome row."""
    for minute, (run_id, spec) in enumerate(RUNS.items()):
        _write_run(tmp_path, run_id, *spec, minute)
    return tmp_path


def _column(table, name):
    return dict(zip(table["run_id"].to_pylist(), table[name].to_pylist(), strict=True))


def test_summary_values_by_hand(logs):
    s = load_runs(logs, target=0.8).summary
    assert s["run_id"].to_pylist() == ["r1", "r2", "r3", "r4"]
    assert s.column_names[:4] == ["run_id", "experiment", "topology.kind", "seed"]
    assert _column(s, "final_accuracy") == {"r1": 0.8, "r2": 0.9, "r3": 0.7, "r4": 0.75}
    assert _column(s, "best_accuracy") == {"r1": 0.8, "r2": 0.9, "r3": 0.7, "r4": 0.85}
    assert _column(s, "rounds_to_target") == {"r1": 4, "r2": 4, "r3": None, "r4": 2}
    assert _column(s, "vtime_to_target") == {"r1": 2.0, "r2": 2.0, "r3": None, "r4": None}
    assert _column(s, "bytes") == {"r1": 400, "r2": 400, "r3": 400, "r4": 400}
    assert _column(s, "consensus_dist") == {"r1": 0.1, "r2": 0.1, "r3": 0.1, "r4": 0.1}
    assert _column(s, "wall_s") == {"r1": 4.0, "r2": 5.0, "r3": 4.0, "r4": 4.0}
    assert _column(s, "status") == {"r1": "completed", "r2": "completed", "r3": "failed",
                                    "r4": "incomplete"}
    assert _column(s, "error") == {"r1": None, "r2": None, "r3": "RuntimeError: boom",
                                   "r4": None}
    assert _column(s, "policy") == {"r1": "fedavg", "r2": "fedavg", "r3": "clip+trimmed_mean",
                                    "r4": "clip+trimmed_mean"}
    assert _column(s, "attack") == {"r1": "none", "r2": "none", "r3": "alie@0.2",
                                    "r4": "alie@0.2"}
    # a lower target is reached at the first evaluation (round 1 -> 2 rounds done)
    lower = load_runs(logs, target=0.6).summary
    assert lower["rounds_to_target"].to_pylist() == [2, 2, 4, 2]


def test_keys_from_summary_and_config(logs):
    runs = load_runs(logs)
    assert key_values(runs, "topology.kind") == ["ring", "ring", "torus", "torus"]
    assert key_values(runs, "training.lr") == [0.1, 0.1, 0.1, 0.05]
    assert key_values(runs, "aggregation") == ["fedavg", "fedavg", "clip+trimmed_mean",
                                               "clip+trimmed_mean"]
    assert key_values(runs, "attack.kind") == ["none", "none", "alie", "alie"]
    assert key_values(runs, "task.model.hidden") == ["[64]"] * 4
    assert key_values(runs, "status") == ["completed", "completed", "failed", "incomplete"]
    with pytest.raises(ConfigError, match=r"unknown key 'nope\.x'.*\(run_id, experiment"):
        key_values(runs, "nope.x")


def test_swept_column_falls_back_to_config_outside_the_sweep(logs):
    _write_run(logs, "r5", "ring", 2, [NA, 0.4, NA, 0.5], [1, 2, 3, 4], [NA] * 4,
               "completed", 9, constants=False)
    runs = load_runs(logs)
    assert runs.summary["topology.kind"].to_pylist() == ["ring", "ring", "torus", "torus", None]
    assert key_values(runs, "topology.kind") == ["ring", "ring", "torus", "torus", "ring"]


def test_filters(logs):
    runs = load_runs(logs)
    def kept(*texts):
        return filter_runs(runs, [parse_filter(t) for t in texts]).summary["run_id"].to_pylist()
    assert kept("training.lr=0.1") == ["r1", "r2", "r3"]
    assert kept("topology.kind=torus") == ["r3", "r4"]
    assert kept("seed=1") == ["r2", "r4"]
    assert kept("seed=1", "topology.kind=torus") == ["r4"]
    assert kept("status=incomplete") == ["r4"]
    assert kept("task.model.hidden=[64]") == ["r1", "r2", "r3", "r4"]
    with pytest.raises(ConfigError, match="no run matches"):
        kept("seed=7")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_filter("seed")


def test_filter_matches_a_swept_chain_written_as_yaml():
    # a sweep stores a swept list (an aggregation chain) as JSON text in its column
    runs = Runs(pa.table({"run_id": ["a", "b"],
                          "aggregation": ['["feddisco","fedavg"]', "fedavg"]}),
                [{}, {}], ["aggregation"])
    kept = filter_runs(runs, [parse_filter("aggregation=[feddisco, fedavg]")])
    assert kept.summary["run_id"].to_pylist() == ["a"]
    kept = filter_runs(runs, [parse_filter("aggregation=fedavg")])
    assert kept.summary["run_id"].to_pylist() == ["b"]


def test_group_by_equals_hand_computation(logs):
    table = group_by(load_runs(logs), ["topology.kind"])
    assert table["topology.kind"].to_pylist() == ["ring", "torus"]
    assert table["runs"].to_pylist() == [2, 2]
    mean, std = table["final_accuracy_mean"].to_pylist(), table["final_accuracy_std"].to_pylist()
    assert mean == pytest.approx([0.85, 0.725])  # (0.8 + 0.9) / 2, (0.7 + 0.75) / 2
    assert std == pytest.approx([0.0707107, 0.03535534])  # |a - b| / sqrt(2)
    assert table["best_accuracy_mean"].to_pylist() == pytest.approx([0.85, 0.775])
    assert table["consensus_dist_std"].to_pylist() == pytest.approx([0.0, 0.0])
    # r3 never reached 0.8: torus averages r4's 2 alone, and one value has no std
    assert table["rounds_to_target_mean"].to_pylist() == pytest.approx([4.0, 2.0])
    assert table["rounds_to_target_std"].to_pylist() == [0.0, None]
    assert table["wall_s_mean"].to_pylist() == pytest.approx([4.5, 4.0])


def test_group_by_two_keys_and_chosen_metrics(logs):
    table = group_by(load_runs(logs), ["training.lr", "attack.kind"], ["final_accuracy", "bytes"])
    assert table.column_names == ["training.lr", "attack.kind", "runs", "final_accuracy_mean",
                                  "final_accuracy_std", "bytes_mean", "bytes_std"]
    assert table["training.lr"].to_pylist() == [0.05, 0.1, 0.1]
    assert table["attack.kind"].to_pylist() == ["alie", "alie", "none"]
    assert table["runs"].to_pylist() == [1, 1, 2]
    assert table["final_accuracy_mean"].to_pylist() == pytest.approx([0.75, 0.7, 0.85])
    assert table["final_accuracy_std"].to_pylist()[:2] == [None, None]
    with pytest.raises(ConfigError, match="unknown metric 'policy'"):
        group_by(load_runs(logs), ["seed"], ["policy"])


def test_csv_and_markdown_parse_back(logs):
    table = group_by(load_runs(logs), ["topology.kind"], ["final_accuracy"])
    rows = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert [r["topology.kind"] for r in rows] == ["ring", "torus"]
    assert [float(r["final_accuracy_mean"]) for r in rows] == pytest.approx([0.85, 0.725])
    assert float(rows[0]["final_accuracy_std"]) == pytest.approx(0.0707107)
    lines = render(table, "markdown").splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["topology.kind", "runs", "final_accuracy_mean", "final_accuracy_std"]
    assert cells[1] == ["---", "---:", "---:", "---:"]
    assert cells[2:] == [["ring", "2", "0.850", "0.071"], ["torus", "2", "0.725", "0.035"]]
    summary = list(csv.DictReader(io.StringIO(render(load_runs(logs).summary, "csv"))))
    assert [r["error"] for r in summary] == ["", "", "RuntimeError: boom", ""]


def test_curves_by_swept_columns(logs):
    runs = load_runs(logs)
    found = curves(runs, read_table(logs, "rounds"), parse_plot("accuracy:round"))
    assert [c.label for c in found] == ["topology.kind=ring", "topology.kind=torus"]
    ring, torus = found
    assert ring.x.tolist() == [1.0, 3.0] and ring.runs.tolist() == [2, 2]
    assert ring.mean == pytest.approx([0.65, 0.85])
    assert ring.std == pytest.approx([0.0707107, 0.0707107])
    assert torus.mean == pytest.approx([0.675, 0.725])
    assert torus.std == pytest.approx([0.24748737, 0.03535534])  # 0.35 / sqrt(2), 0.05 / sqrt(2)


def test_curves_against_time_and_custom_groups(logs):
    runs, rounds = load_runs(logs), read_table(logs, "rounds")
    (ring,) = curves(runs, rounds, parse_plot("accuracy:virtual_time"))  # torus logs none
    assert ring.x.tolist() == [1.0, 2.0] and ring.mean == pytest.approx([0.65, 0.85])
    wall = curves(runs, rounds, parse_plot("accuracy:wall_time"))
    assert wall[0].x.tolist() == [2.5, 4.5]  # mean of (2, 3) and (4, 5)
    by_seed = curves(runs, rounds, parse_plot("accuracy:round"), ["seed"])
    assert [c.label for c in by_seed] == ["seed=0", "seed=1"]
    assert by_seed[0].mean == pytest.approx([0.55, 0.75])  # r1 with r3
    single = curves(filter_runs(runs, [parse_filter("seed=0")]), rounds,
                    parse_plot("loss:round"), ["run_id"])
    assert [c.label for c in single] == ["run_id=r1", "run_id=r3"]
    assert single[0].x.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert single[0].runs.tolist() == [1] * 4 and np.isnan(single[0].std).all()
    with pytest.raises(ConfigError, match="no run logs both"):
        curves(filter_runs(runs, [parse_filter("topology.kind=torus")]), rounds,
               parse_plot("accuracy:virtual_time"))
    for bad in ["accuracy", "nope:round", "accuracy:nope"]:
        with pytest.raises(ConfigError, match="--plot"):
            parse_plot(bad)


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).ndim == 3


def test_plot_png_has_one_line_per_curve(logs, tmp_path):
    runs = load_runs(logs)
    spec = parse_plot("accuracy:round")
    for keys, lines in [((), 2), (["run_id"], 4), (["seed", "topology.kind"], 4)]:
        found = curves(runs, read_table(logs, "rounds"), spec, keys)
        figure = draw_curves(found, spec)
        assert len(found) == lines and len(figure.axes[0].get_lines()) == lines
        _assert_png(save_png(figure, tmp_path / "plots" / f"{len(keys)}.png"))


def test_heatmap_matrix_by_hand(logs, tmp_path):
    runs = load_runs(logs)
    found = heatmap(runs, "topology.kind", "training.lr", "final_accuracy")
    assert found.rows == ["ring", "torus"] and found.cols == ["0.05", "0.1"]
    np.testing.assert_allclose(found.values, [[np.nan, 0.85], [0.75, 0.7]])
    path = write_heatmap(runs, ["attack.kind", "aggregation"], "final_accuracy", tmp_path)
    assert path.name == "heatmap_final_accuracy_attack.kind_aggregation.png"
    _assert_png(path)
    with pytest.raises(ConfigError, match="expected two keys"):
        write_heatmap(runs, ["seed"], "final_accuracy", tmp_path)


def test_sql_over_the_dataset(logs):
    counts = query(logs, "select run_id, count(*) as n from rounds group by run_id order by 1")
    assert counts.to_pylist() == [{"run_id": r, "n": 4} for r in RUNS]
    statuses = query(logs, "select status, count(*) as n from outcomes group by 1 order by 1")
    assert statuses.to_pylist() == [{"status": "completed", "n": 2}, {"status": "failed", "n": 1}]
    swept = query(logs, 'select "topology.kind" as kind, avg(test_accuracy) as acc from rounds '
                        "where round = 3 group by 1 order by 1")
    assert swept["acc"].to_pylist() == pytest.approx([0.85, 0.725])
    for bad in ["select nope from rounds", "select * from clients"]:  # no clients logged
        with pytest.raises(ConfigError, match="^--sql: ") as err:
            query(logs, bad)
        assert "\n" not in str(err.value)


def _analyze(*args):
    return subprocess.run([sys.executable, "run.py", "analyze", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_group_by_csv(logs):
    done = _analyze(str(logs), "--group-by", "topology.kind", "--metric", "final_accuracy",
                    "--filter", "training.lr=0.1", "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["topology.kind"], r["runs"]) for r in rows] == [("ring", "2"), ("torus", "1")]
    assert [float(r["final_accuracy_mean"]) for r in rows] == pytest.approx([0.85, 0.7])


def test_cli_unknown_key_is_one_line_exit_2(logs):
    done = _analyze(str(logs), "--group-by", "topology.kind,nope")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: unknown key 'nope'")
