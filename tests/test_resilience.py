"""Resilience, with real processes: signals end a run cleanly on both backends, and nothing
of ours is left running."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


def _descendants_of(marker: str) -> set[int]:
    """Processes whose command line holds `marker`, and their descendants."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
            table[int(entry.name)] = (ppid, cmd)
    mine = {pid for pid, (_, cmd) in table.items() if marker in cmd}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return mine - {os.getpid()}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PLACEMENT = """
import sys, ray
from engine.backends.runtime import RuntimeOptions
from engine.experiment import prepare
from engine.resolve import load
b = prepare(load("configs/quickstart.yaml", ["rounds=3"]))
pools = b.mode.pools(b.task, b.spec, RuntimeOptions("ray", 2, sys.argv[1]), b.params, None,
                     b.seeds)
print(len(set(pools.nodes())), len(ray.nodes()))
"""


def test_a_two_node_cluster_started_with_ray_start_places_pools_on_both_nodes(tmp_path):
    """The README's recipe on one machine: `ray start --head`, a second node with `ray start
    --address`, then `run.py --address host:port` (token authentication, Ray's default). The
    two pools land on the two nodes, and the run's rows equal an inline run's bit for bit.
    Only the processes this test started are ended, found by the cluster's own temp dir."""
    # a short temp dir: Ray's unix sockets live there, and their paths are limited to 107 bytes
    temp, port = Path(tempfile.mkdtemp(prefix="concord-ray-", dir="/tmp")), _free_port()
    address = f"127.0.0.1:{port}"
    # token authentication, as `ray start --head` turns it on; a joining node needs it set,
    # run.py sets it itself (the driver's env has no RAY_AUTH_MODE)
    # (and not the settings this test process's own private Ray put in its environment)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    node_env = {**env, "RAY_AUTH_MODE": "token"}
    ray_bin = str(Path(sys.executable).parent / "ray")
    try:
        for args in (["--head", f"--port={port}", f"--temp-dir={temp}",
                      "--include-dashboard=false"], [f"--address={address}"]):
            started = subprocess.run([ray_bin, "start", *args, "--num-cpus=1",
                                      "--node-ip-address=127.0.0.1"], env=node_env, cwd=ROOT,
                                     capture_output=True, text=True, timeout=180)
            assert started.returncode == 0, started.stderr[-2000:]
        placed = subprocess.run([sys.executable, "-c", PLACEMENT, address], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=180)
        assert placed.stdout.split() == ["2", "2"], placed.stderr[-2000:]
        rows = {}
        for backend in (["--address", address], ["--backend", "inline"]):
            log = tmp_path / backend[-1].replace(":", "_")
            done = subprocess.run([sys.executable, "run.py", "configs/quickstart.yaml",
                                   "rounds=4", "eval_every=1", *backend, "--no-progress",
                                   "--log-dir", str(log)], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            rounds = read_table(log / "quickstart", "rounds").sort_by("round")
            rows[backend[0]] = rounds.select(["round", "num_updates", "train_loss",
                                              "test_loss", "test_accuracy"]).to_pylist()
        assert rows["--address"] == rows["--backend"]
    finally:
        for pid in _descendants_of(str(temp)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
