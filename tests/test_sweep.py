"""Sweeps: expansion and stable ids, skip/resume/retry on real Ray, failures recorded, and the
combined dataset read back by pyarrow, DuckDB and polars without our code."""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml

from engine.core.errors import ConfigError
from engine.records.logs import read_table
from engine.sweeps.scheduler import InlineRunner, RayRunner, run_sweep
from engine.sweeps.sweep import finished_runs, load_sweep, pending
from tests.conftest import ROOT, small_raw

BASE = small_raw(task={"model": {"kind": "mlp", "hidden": [16]}},
                 population={"num_clients": 12, "participation": {"clients_per_round": 4}},
                 training={"local_epochs": 1})
GOSSIP = {**BASE, "mode": "decentralized", "population": {"num_clients": 12},
          "topology": {"kind": "ring"}, "gossip": {"eval_peers": 4}}


def write_sweep(tmp_path, sweep: dict, base: dict = BASE, name: str = "sw"):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **sweep}, sort_keys=False))
    return path


def test_grid_zip_random_and_seeds_expand_to_their_product(tmp_path):
    path = write_sweep(tmp_path, {
        "names": {"k": "population.participation.clients_per_round"},
        "grid": {"k": [2, 4], "training.local_epochs": [1, 2, 3]},
        "zip": {"training.lr": [0.1, 0.05], "training.batch_size": [8, 16]},
        "random": {"samples": 2, "seed": 5, "params": {
            "training.momentum": {"uniform": [0.0, 0.9]},
            "partition.alpha": {"loguniform": [0.1, 10.0]},
            "task.model.hidden": {"choice": [[16], [32, 16]]}}},
        "seeds": [0, 9]})
    sweep = load_sweep(path)
    assert len(sweep.runs) == 2 * 3 * 2 * 2 * 2
    assert list(sweep.columns) == ["k", "training.local_epochs", "training.lr",
                                   "training.batch_size", "training.momentum", "partition.alpha",
                                   "task.model.hidden", "seed"]
    first, last = sweep.runs[0], sweep.runs[-1]
    assert first.params["seed"] == 0 and sweep.runs[1].params["seed"] == 9  # seeds innermost
    assert first.config.population.participation.clients_per_round == 2  # the name's key
    assert last.config.training.lr == 0.05 and last.config.training.batch_size == 16
    assert last.config.seed == 9 and last.config.experiment == "sw"
    drawn = {(r.params["training.momentum"], r.params["partition.alpha"]) for r in sweep.runs}
    assert len(drawn) == 2  # two random samples, shared by every grid/zip point
    for momentum, alpha in drawn:
        assert 0 <= momentum <= 0.9 and 0.1 <= alpha <= 10
    assert {r.params["task.model.hidden"] == [32, 16] or r.params["task.model.hidden"] == [16]
            for r in sweep.runs} == {True}
    types = {c: v.type for c, v in last.constants.items()}
    assert types == {"k": pa.int64(), "training.local_epochs": pa.int64(),
                     "training.lr": pa.float64(), "training.batch_size": pa.int64(),
                     "training.momentum": pa.float64(), "partition.alpha": pa.float64(),
                     "task.model.hidden": pa.string(), "seed": pa.int64()}


def test_run_ids_are_stable_distinct_and_follow_the_config(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"training.lr": [0.1, 0.2]}, "seeds": 2,
                                  "random": {"samples": 2, "params": {
                                      "training.momentum": {"uniform": [0, 0.5]}}}})
    ids = [r.run_id for r in load_sweep(path).runs]
    assert ids == [r.run_id for r in load_sweep(path).runs]
    assert len(set(ids)) == len(ids) == 8
    changed = [r.run_id for r in load_sweep(path, ["rounds=4"]).runs]
    assert not set(changed) & set(ids)


def test_int_choice_and_mixed_number_columns(tmp_path):
    path = write_sweep(tmp_path, {
        "grid": {"training.lr": [1, 0.5]},  # an int and a float: one float64 column
        "random": {"samples": 30, "seed": 1, "params": {"rounds": {"int": [2, 4]}}}})
    sweep = load_sweep(path)
    assert len(sweep.runs) == 6  # 30 draws of 3 values: repeated points are one run
    assert {r.params["rounds"] for r in sweep.runs} == {2, 3, 4}
    assert all(r.constants["training.lr"].type == pa.float64() for r in sweep.runs)
    assert sweep.runs[0].config.training.lr == 1.0


@pytest.mark.parametrize("sweep, message", [
    ({"zip": {"training.lr": [0.1, 0.2], "rounds": [1]}}, "equal lengths"),
    ({"grid": {"rounds": [1]}, "zip": {"rounds": [2]}}, "more than one axis"),
    ({"grid": {"training.lrr": [0.1]}}, "training.lrr: unknown key"),
    ({"grid": {"training.lr": [-1]}}, "sweep run [training.lr=-1 seed=7]: training.lr"),
    ({"grid": {"experiment": ["a", "b"]}}, "cannot sweep 'experiment'"),
    ({"names": {"round": "rounds"}, "grid": {"round": [1, 2]}}, "cannot sweep 'round'"),
    ({"random": {"samples": 2, "params": {"training.lr": {"loguniform": [0, 1]}}}}, "> 0"),
    ({"random": {"samples": 2, "params": {"training.lr": {"normal": [0, 1]}}}}, "random"),
    ({"grid": {"rounds": []}}, "grid.rounds"),
    ({"grids": {}}, "grids"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, sweep, message):
    with pytest.raises(ConfigError) as err:
        load_sweep(write_sweep(tmp_path, sweep))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_base_names_the_file(tmp_path):
    path = tmp_path / "sw.yaml"
    path.write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_sweep(path)


def test_failing_run_is_recorded_and_reruns_skip_resume_and_retry(tmp_path, ray_cluster):
    """On real Ray: the edge-list graph's file is gone by the time the sweep runs (every run
    was checked at load), so that run fails (in the world model, before its logger exists)
    while the others finish; a rerun runs nothing; a run left unfinished is redone from
    scratch; --retry-failed reruns only the failure."""
    edges = tmp_path / "edges.txt"
    edges.write_text("".join(f"{i} {(i + 1) % 12}\n" for i in range(12)))
    path = write_sweep(tmp_path, {"grid": {"topology.kind": ["ring", "edge_list", "torus"]},
                                  "set": {"topology.edge_list.path": str(edges)}, "seeds": 2},
                       base=GOSSIP)
    sweep = load_sweep(path)
    assert not sweep.refused
    edges.unlink()
    logs = tmp_path / "logs"
    report = run_sweep(sweep, logs, RayRunner(1, None, None), show_progress=False)
    failed = {o.run.params["seed"]: o for o in report.failed}
    assert len(report.outcomes) == 6 and sorted(failed) == [0, 1]
    assert all(o.run.params["topology.kind"] == "edge_list" for o in failed.values())
    assert "edges.txt" in failed[0].error
    log_dir = logs / "sw"
    status = finished_runs(log_dir)
    assert sorted(status.values()) == ["completed"] * 4 + ["failed"] * 2
    runs = read_table(log_dir, "runs")
    assert runs.num_rows == 6  # the failed runs have their runs row too
    outcomes = read_table(log_dir, "outcomes").to_pylist()
    assert {o["error"] for o in outcomes if o["status"] == "failed"} == {failed[0].error,
                                                                         failed[1].error}

    again = run_sweep(sweep, logs, RayRunner(1, None, None), show_progress=False)
    assert again.outcomes == [] and again.skipped == 6

    ring = next(r for r in sweep.runs if r.params["topology.kind"] == "ring")
    shutil.rmtree(log_dir / "outcomes" / f"run_id={ring.run_id}")  # as if killed mid-run
    assert [r.run_id for r in pending(sweep, log_dir)] == [ring.run_id]
    resumed = run_sweep(sweep, logs, RayRunner(1, None, None), show_progress=False)
    assert [o.run.run_id for o in resumed.outcomes] == [ring.run_id]
    rounds = read_table(log_dir, "rounds")
    per_run = rounds.group_by("run_id").aggregate([("round", "count")])
    assert sorted(per_run["round_count"].to_pylist()) == [3, 3, 3, 3]  # no duplicate rows

    retried = run_sweep(sweep, logs, InlineRunner(1), retry_failed=True, show_progress=False)
    assert sorted(o.run.params["seed"] for o in retried.outcomes) == [0, 1]


def test_runs_with_a_multi_cpu_share_use_ray_pools(tmp_path, ray_cluster):
    """cpus_per_run=2: the run's two pool actors live in its placement group; same results
    as the inline runner."""
    path = write_sweep(tmp_path, {"grid": {"training.lr": [0.1]}, "cpus_per_run": 2})
    sweep = load_sweep(path)
    (ray_out,) = run_sweep(sweep, tmp_path / "ray", RayRunner(2, None, None),
                           show_progress=False).outcomes
    (inline_out,) = run_sweep(sweep, tmp_path / "inline", InlineRunner(2),
                              show_progress=False).outcomes
    assert ray_out.status == "completed", ray_out.error
    runs = read_table(tmp_path / "ray" / "sw", "runs")
    assert runs["num_pools"].to_pylist() == [2] and runs["backend"].to_pylist() == ["ray"]
    assert ray_out.final_accuracy == inline_out.final_accuracy
    assert math.isfinite(ray_out.final_accuracy)


@pytest.fixture(scope="module")
def swept_logs(tmp_path_factory):
    """A 2 x 2 x 2-seed sweep run inline once for the dataset tests."""
    tmp_path = tmp_path_factory.mktemp("dataset")
    path = write_sweep(tmp_path, {
        "names": {"peers": "population.num_clients"},
        "grid": {"topology.kind": ["ring", "complete"], "peers": [8, 12]}, "seeds": 2},
        base=GOSSIP)
    run_sweep(load_sweep(path), tmp_path / "logs", InlineRunner(1), show_progress=False)
    return tmp_path / "logs" / "sw"


SWEPT = {"topology.kind": pa.string(), "peers": pa.int64(), "seed": pa.int64()}


def test_dataset_reads_back_with_pyarrow_alone(swept_logs):
    rounds = ds.dataset(swept_logs / "rounds", format="parquet", partitioning="hive").to_table()
    assert rounds.num_rows == 8 * 3
    keys = set(zip(rounds["run_id"].to_pylist(), rounds["round"].to_pylist(), strict=True))
    assert len(keys) == rounds.num_rows  # one row per (run, round)
    for column, kind in SWEPT.items():
        assert rounds.schema.field(column).type == kind
    runs = ds.dataset(swept_logs / "runs", format="parquet", partitioning="hive").to_table()
    by_run = {r["run_id"]: r for r in runs.to_pylist()}
    for row in rounds.to_pylist():  # the columns agree with each run's config
        config = yaml.safe_load(by_run[row["run_id"]]["config_yaml"])
        assert config["population"]["num_clients"] == row["peers"]
        assert config["topology"]["kind"] == row["topology.kind"]
        assert config["seed"] == row["seed"]


def test_dataset_reads_back_with_duckdb_and_polars(swept_logs):
    duckdb = pytest.importorskip("duckdb")
    pl = pytest.importorskip("polars")
    glob = str(swept_logs / "rounds" / "*" / "*.parquet")
    counts = duckdb.sql(
        f"select \"topology.kind\", peers, count(*) as n from read_parquet('{glob}', "
        "hive_partitioning=true) group by all order by all").fetchall()
    assert counts == [("complete", 8, 6), ("complete", 12, 6), ("ring", 8, 6), ("ring", 12, 6)]
    frame = pl.scan_parquet(glob, hive_partitioning=True).collect()
    assert frame.height == 24 and frame.schema["peers"] == pl.Int64
    distance = {kind: frame.filter(pl.col("topology.kind") == kind)["consensus_distance"]
                for kind in ("complete", "ring")}
    # one averaging step on the complete graph agrees up to float32 rounding; a ring does not
    assert distance["complete"].max() < 1e-6 < 1e-3 < distance["ring"].min()


def test_shipped_sweeps_expand(tmp_path):
    for name, runs in [("topologies", 36), ("byzantine", 112), ("participation", 15),
                       ("weightings", 30), ("async_vs_sync", 6),
                       ("server_aggregation", 30)]:
        assert len(load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml").runs) == runs


def test_sweep_command_twice_then_analyze_as_in_readme(tmp_path):
    """`python run.py sweep configs/sweeps/topologies.yaml` (shortened to 2 rounds), twice:
    the second invocation (inline: nothing is left to run on Ray) runs nothing; then every
    README `analyze logs/topologies` command."""
    command = [sys.executable, str(ROOT / "run.py"), "sweep",
               str(ROOT / "configs/sweeps/topologies.yaml"), "rounds=2", "--no-progress"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "36 runs: 36 completed, 0 failed, 0 already finished" in first.stdout
    second = subprocess.run([*command, "--backend", "inline"], cwd=tmp_path,  # no Ray needed
                            capture_output=True, text=True, timeout=300)
    assert "36 runs: 0 completed, 0 failed, 36 already finished" in second.stdout
    runs = read_table(tmp_path / "logs" / "topologies", "runs", constants=True)
    sizes = {}
    for row in runs.to_pylist():
        sizes.setdefault(row["topology.kind"], set()).add(row["peers"])
    assert sizes == {kind: {16, 64} for kind in ["ring", "torus", "small_world",
                                                 "random_regular", "erdos_renyi", "complete"]}
    readme = (ROOT / "README.md").read_text().splitlines()
    analyses = [shlex.split(line.split("  #")[0]) for line in readme
                if line.startswith("python run.py analyze logs/topologies")]
    assert len(analyses) >= 5
    for args in analyses:
        done = subprocess.run([sys.executable, str(ROOT / "run.py"), *args[2:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    assert (tmp_path / "plots" / "consensus_vs_round.png").is_file()


def test_sweep_command_errors_are_one_line(tmp_path):
    path = write_sweep(tmp_path, {"grid": {"training.lr": [0.1, -1]}})
    done = subprocess.run([sys.executable, "run.py", "sweep", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "training.lr" in done.stderr
