"""Ray's network exposure: the embedded cluster listens on loopback only."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.procs import descendants, is_loopback, listening, named


def test_an_embedded_run_listens_on_loopback_only(tmp_path):
    """Every listening socket of a running `run.py` (driver, GCS, raylet, agents, pool
    workers) is bound to a loopback address."""
    cmd = [sys.executable, "run.py", "configs/quickstart.yaml", "rounds=100000",
           "--no-progress", "--log-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(named(proc.pid, "ray::PoolHost")) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        time.sleep(2)  # the pools' own servers are up once they train
        sockets = listening(descendants(proc.pid))
        assert len(sockets) >= 5, sockets  # GCS, raylet, driver and pool workers at least
        pool_pids = set(named(proc.pid, "ray::PoolHost"))
        assert pool_pids & {pid for _, _, pid in sockets}, "the pools' servers were not found"
        exposed = [s for s in sockets if not is_loopback(s[0])]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
