"""Arrow logs: declared schemas, row counts, atomic part files, readable after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds

from engine.logs import ROUNDS, RoundRows, RunLogger, read_table
from tests.conftest import ROOT


def _round_rows(r: int, acc: float) -> RoundRows:
    one = lambda v: np.array([v])  # noqa: E731
    return RoundRows(*(one(v) for v in [r, 5, 5, 0, 0.5, acc, acc, 1.0, 0.1, 0.1, 0.0, 0.0,
                                        0.1 * r, 50.0]))


def test_rows_round_trip_with_nulls(tmp_path):
    log = RunLogger(tmp_path, "r1", flush_every_s=3600)
    log.append(_round_rows(0, np.nan))
    log.append(_round_rows(1, 0.75))
    assert read_table(tmp_path, "rounds").num_rows == 0  # nothing flushed yet
    log.flush()
    table = read_table(tmp_path, "rounds")
    assert table.schema.remove(table.schema.get_field_index("run_id")) == ROUNDS
    assert table["test_accuracy"].to_pylist() == [None, 0.75]
    assert table["run_id"].to_pylist() == ["r1", "r1"]


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
    from engine.logs import TABLES

    for record, (_, schema) in TABLES.items():
        assert list(record._fields) == schema.names
