"""Arrow logs: declared schemas, row counts, atomic part files, readable after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from engine.records.logs import MISSING, ROUNDS, RoundRows, RunLogger, read_table
from tests.conftest import ROOT


def _round_rows(r: int, acc: float | None) -> RoundRows:
    one = lambda v: np.array([v], dtype=object if v is None else None)  # noqa: E731
    return RoundRows(*(one(v) for v in [r, 5, 5, 0, 0.5, acc, acc, 1.0, 0.1, 0.1, 0.0, 0.0,
                                        0.1 * r, 50.0]))


def test_rows_round_trip_with_nulls_apart_from_nan(tmp_path):
    """Not evaluated (MISSING) is null; a NaN accuracy is a NaN value, not a null."""
    log = RunLogger(tmp_path, "r1", flush_every_s=3600)
    log.append(_round_rows(0, MISSING))
    log.append(_round_rows(1, 0.75))
    log.append(_round_rows(2, np.nan))
    assert read_table(tmp_path, "rounds").num_rows == 0  # nothing flushed yet
    log.flush()
    table = read_table(tmp_path, "rounds")
    assert table.schema.remove(table.schema.get_field_index("run_id")) == ROUNDS
    accuracy = table["test_accuracy"]
    assert accuracy.to_pylist()[:2] == [None, 0.75]
    assert accuracy.null_count == 1 and np.isnan(accuracy.to_pylist()[2])
    assert table["consensus_distance"].null_count == 3  # not applicable: null, not NaN
    assert table["run_id"].to_pylist() == ["r1", "r1", "r1"]


def test_part_files_are_renamed_into_place(tmp_path):
    log = RunLogger(tmp_path, "r1", flush_every_s=3600)
    for r in range(3):
        log.append(_round_rows(r, 0.5))
        log.flush()
    files = sorted(p.name for p in (tmp_path / "rounds" / "run_id=r1").iterdir())
    assert files == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]


def test_logs_readable_after_sigkill(tmp_path):
    """Kill a long run with SIGKILL mid-flight; every flushed file must read back whole."""
    cmd = [sys.executable, "run.py", "configs/quickstart.yaml", "rounds=100000",
           "experiment=killed", f"--log-dir={tmp_path}", "--backend=inline", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    folder = tmp_path / "killed" / "clients"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(folder.glob("run_id=*/part-*"))) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rounds = read_table(tmp_path / "killed", "rounds")
    clients = read_table(tmp_path / "killed", "clients")
    assert rounds.num_rows >= 1
    assert sorted(rounds["round"].to_pylist()) == list(range(rounds.num_rows))
    # a round listed in `rounds` has all its 20 client rows (rounds is written last)
    logged = clients.filter(pc.is_in(clients["round"], rounds["round"]))
    assert logged.num_rows == 20 * rounds.num_rows
    # also readable with plain pyarrow.dataset, no project code
    assert ds.dataset(tmp_path / "killed" / "rounds", partitioning="hive").count_rows() >= 1


def test_row_records_match_their_schemas():
    """Each typed row record names exactly its table's columns, in order."""
    from engine.records.logs import TABLES

    for record, (_, schema) in TABLES.items():
        assert list(record._fields) == schema.names


def test_outcome_and_bytes_of_a_completed_run(tmp_path):
    """A finished run has one `completed` outcome; each round's bytes are the model down to
    every selected client and its update back up: 2 x 5 clients x P float32 values."""
    from engine.backends.runtime import RuntimeOptions
    from engine.experiment import run_experiment
    from tests.conftest import small_config

    result = run_experiment(small_config(), RuntimeOptions("inline"), tmp_path, False)
    (outcome,) = read_table(result.log_dir, "outcomes").to_pylist()
    assert outcome["status"] == "completed" and outcome["error"] is None
    assert outcome["rounds_done"] == 3 and outcome["run_id"] == result.run_id
    size = result.loop.params.numel()
    rounds = read_table(result.log_dir, "rounds")
    assert rounds["bytes_communicated"].to_pylist() == [2 * 5 * size * 4] * 3


def test_a_run_that_crashes_mid_loop_records_how_it_ended(tmp_path, monkeypatch):
    """The loop raises in round 1's evaluation: the error propagates, round 0 stays on disk,
    and the outcomes row says failed, with the error and the rounds done."""
    import pytest

    import engine.experiment as experiment
    from engine.backends.runtime import RuntimeOptions
    from tests.conftest import small_config

    class Exploding:
        def __init__(self, *args):
            self.calls = 0

        def __call__(self, params):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("evaluation\nfailed")
            return 1.0, 0.5

    monkeypatch.setattr(experiment, "task_evaluator", Exploding)
    with pytest.raises(RuntimeError):
        experiment.run_experiment(small_config(), RuntimeOptions("inline"), tmp_path, False)
    (outcome,) = read_table(tmp_path / "test", "outcomes").to_pylist()
    assert outcome["status"] == "failed" and outcome["rounds_done"] == 1
    assert outcome["error"] == "RuntimeError: evaluation failed"
    assert read_table(tmp_path / "test", "rounds")["round"].to_pylist() == [0]
