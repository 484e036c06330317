"""Resilience, with real processes: signals end a run cleanly on both backends, and nothing
of ours is left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.records.logs import read_table
from tests.conftest import ROOT


def ray_processes() -> set[int]:
    """Pids of the machine's Ray processes (raylet, GCS, workers, agents)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "/ray/" in cmdline and ("session_" in cmdline or "default_worker" in cmdline) \
                or cmdline.startswith("ray::"):
            found.add(int(entry.name))
    return found


def start_run(log_dir: Path, backend: str, *overrides: str) -> subprocess.Popen:
    """run.py on the quickstart, long enough to be stopped; returns once it logs rounds."""
    proc = subprocess.Popen(
        [sys.executable, "run.py", "configs/quickstart.yaml", "rounds=100000", *overrides,
         "--backend", backend, "--no-progress", "--log-dir", str(log_dir)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (log_dir / "quickstart" / "rounds").is_dir():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no round was logged in 120 s"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("backend, sig, code", [
    ("inline", signal.SIGTERM, 143), ("ray", signal.SIGTERM, 143),
    ("inline", signal.SIGINT, 130)])
def test_a_signal_ends_the_run_as_interrupted_and_leaves_nothing_running(tmp_path, backend,
                                                                         sig, code):
    before = ray_processes()
    proc = start_run(tmp_path, backend)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.count("\n") == 1 and "Traceback" not in err
    (outcome,) = read_table(tmp_path / "quickstart", "outcomes").to_pylist()
    assert outcome["status"] == "interrupted" and outcome["rounds_done"] > 0
    rounds = read_table(tmp_path / "quickstart", "rounds")["round"].to_pylist()
    assert sorted(rounds) == list(range(len(rounds)))  # every logged round, none twice
    deadline = time.monotonic() + 10  # processes exiting may take a moment to be reaped
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    left = ray_processes() - before
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left
                      if os.path.exists(f"/proc/{p}")]
