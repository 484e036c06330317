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

import numpy as np
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


def start_run(log_dir: Path, backend: str, *overrides: str,
              wait: bool = True) -> subprocess.Popen:
    """run.py on the quickstart, long enough to be stopped; returns once it logs rounds
    (at once, without `wait`)."""
    proc = subprocess.Popen(
        [sys.executable, "run.py", "configs/quickstart.yaml", "rounds=100000", *overrides,
         "--backend", backend, "--no-progress", "--log-dir", str(log_dir)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while wait and not (log_dir / "quickstart" / "rounds").is_dir():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no round was logged in 120 s"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("backend, sig, code", [  # inline SIGTERM: the resume test below
    ("ray", signal.SIGTERM, 143), ("inline", signal.SIGINT, 130)])
def test_a_signal_ends_the_run_as_interrupted_and_leaves_nothing_running(tmp_path, backend,
                                                                         sig, code):
    before = ray_processes()
    proc = start_run(tmp_path, backend)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    what, resume = err.splitlines()  # what happened, and the command that continues it
    assert what.startswith(("terminated:", "interrupted:")) and "Traceback" not in err
    assert resume.startswith(f"  to continue it: python run.py resume {tmp_path}/quickstart ")
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


def _wait_checkpoints(log: Path, count: int, proc: subprocess.Popen) -> None:
    """Until the run has written `count` periodic checkpoints after its first (polling the
    file's mtime: reading the logs would take the CPU the run needs)."""
    seen, last = 0, None
    while seen <= count:
        assert proc.poll() is None, "the run ended before it could be stopped"
        found = list(log.glob("checkpoints/run_id=*/checkpoint.pkl"))
        mtime = found[0].stat().st_mtime_ns if found else None
        if mtime is not None and mtime != last:
            seen, last = seen + 1, mtime
        time.sleep(0.01)


def _pool_hosts() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::PoolHost"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _final(log_dir: Path, experiment: str):
    """A finished run's saved model and its rounds (wall-time columns left out)."""
    import torch

    (path,) = (log_dir / experiment / "models").rglob("model.pt")
    rounds = read_table(log_dir / experiment, "rounds").sort_by("round")
    keep = [c for c in rounds.column_names if "wall" not in c and c not in (
        "run_id", "client_updates_per_s")]
    return torch.load(path)["params"], rounds.select(keep).to_pylist()


QUICK = ["rounds=100", "population.num_clients=100", "training.local_epochs=1",
         "eval_every=10"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The QUICK run never stopped (inline): its model, rounds and number of client rows."""
    root = tmp_path_factory.mktemp("clean")
    done = subprocess.run([sys.executable, "run.py", "configs/quickstart.yaml", *QUICK,
                           "--backend", "inline", "--no-progress", "--log-dir", str(root)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return _final(root, "quickstart"), read_table(root / "quickstart", "clients").num_rows


def _same(a, b) -> bool:
    import math

    import torch

    def norm(rows):
        return [{k: ("nan" if isinstance(v, float) and math.isnan(v) else v)
                 for k, v in row.items()} for row in rows]

    return torch.equal(a[0], b[0]) and norm(a[1]) == norm(b[1])


def test_a_killed_pool_actor_is_replaced_and_the_run_ends_as_a_clean_one(tmp_path, clean):
    """SIGKILL one pool's worker process (found by pid) mid-run: the run replaces it,
    replays from its last checkpoint and completes; its model and rounds equal a clean run's
    bit for bit, and the events table has the pool_restart."""
    before = _pool_hosts()
    proc = start_run(tmp_path / "killed", "ray", *QUICK, "--checkpoint-every", "10",
                     wait=False)
    while not (hosts := _pool_hosts() - before):
        time.sleep(0.05)
    log = tmp_path / "killed" / "quickstart"
    _wait_checkpoints(log, 2, proc)
    os.kill(min(hosts), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    (restart,) = [e for e in read_table(log, "events").to_pylist()
                  if e["kind"] == "pool_restart"]
    assert 0 < restart["value"] < 60  # seconds to replace and restore
    assert _same(_final(tmp_path / "killed", "quickstart"), clean[0])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_or_stopped_run_resumes_to_the_same_bits_without_a_row_twice(tmp_path, sig,
                                                                              clean):
    """SIGKILL (no outcome, rows past the last checkpoint on disk) or SIGTERM (a checkpoint at
    the end of the round, outcome interrupted), then `run.py resume`: the saved model and
    every round row equal a clean run's, each round once, one outcome (completed)."""
    log = tmp_path / "run" / "quickstart"
    proc = start_run(tmp_path / "run", "inline", *QUICK, "--checkpoint-every", "7",
                     wait=False)
    _wait_checkpoints(log, 2, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert read_table(log, "rounds").num_rows < 100
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    if sig == signal.SIGTERM:  # interrupted (inline), and the command that continues it
        assert read_table(log, "outcomes")["status"].to_pylist() == ["interrupted"]
        assert f"to continue it: python run.py resume {log} --run-id" in stderr
    done = subprocess.run([sys.executable, "run.py", "resume", str(log), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming run" in done.stderr
    assert _same(_final(tmp_path / "run", "quickstart"), clean[0])
    outcomes = read_table(log, "outcomes").to_pylist()
    assert [o["status"] for o in outcomes] == ["completed"]
    clients = read_table(log, "clients").select(["round", "client_id"]).to_pylist()
    assert len(clients) == len({(c["round"], c["client_id"]) for c in clients}) == clean[1]
    again = subprocess.run([sys.executable, "run.py", "resume", str(log)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "no checkpoint to resume" in again.stderr


def test_a_sweep_killed_mid_run_continues_that_run_from_its_checkpoint(tmp_path, clean):
    """SIGKILL `run.py sweep` mid-run, run the same command again: the unfinished run goes
    on from its checkpoint (not from round 0) and ends with a never-stopped run's model and
    rows, each round once."""
    import yaml

    sweep = tmp_path / "sw.yaml"
    sweep.write_text(yaml.safe_dump({
        "base": str(ROOT / "configs" / "quickstart.yaml"),
        "set": {key: yaml.safe_load(value) for key, value in
                (item.split("=") for item in QUICK)}}))
    command = [sys.executable, "run.py", "sweep", str(sweep), "--backend", "inline",
               "--checkpoint-every", "7", "--no-progress", "--log-dir", str(tmp_path)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_checkpoints(tmp_path / "sw", 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    rounds = read_table(tmp_path / "sw", "rounds")
    assert 0 < rounds.num_rows < 100
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from its checkpoint" in again.stdout + again.stderr
    assert _same(_final(tmp_path, "sw"), clean[0])
    clients = read_table(tmp_path / "sw", "clients").select(["round", "client_id"]).to_pylist()
    assert len(clients) == len({(c["round"], c["client_id"]) for c in clients}) == clean[1]
    assert not list((tmp_path / "sw").glob("checkpoints/run_id=*/checkpoint.pkl"))


RESUMED = {
    "fedbuff+scaffold": ("fedbuff_async", ["training.scaffold=true", "rounds=12"]),
    "fedcompass": ("fedcompass", ["rounds=10"]),
    "gossip+momentum+topk": ("gossip_ring", ["training.momentum=0.9", "rounds=10",
                                             "training.compression.kind=topk"]),
    "async_gossip+clipped": ("gossip_async_clipped", ["rounds=8"]),
    "modest+faults": ("modest_failures", ["rounds=12"]),
}


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_every_protocol_resumes_from_a_crash_to_the_same_bits(name, tmp_path, monkeypatch):
    """In this process, inline: a run that crashes after round 6 (its rows for 6 logged, its
    last checkpoint at round 4) is resumed and ends with the model, rounds, clients, peers and
    events of the run never stopped. Asynchronous servers (event queue, model versions,
    SCAFFOLD's controls), peers' models, momentum and CHOCO's public copies, MoDeST's world."""
    from engine.backends.runtime import RuntimeOptions
    from engine.experiment import run_experiment
    from engine.loops import skeleton
    from engine.resolve import load

    config, overrides = RESUMED[name]
    cfg = load(ROOT / "configs" / f"{config}.yaml", [*overrides, "eval_every=2"])
    options = RuntimeOptions("inline", 2, checkpoint_every=5)
    clean = run_experiment(cfg, options, tmp_path / "clean", False)

    real = skeleton._check_alive

    def crash(r, *args):
        real(r, *args)
        if r == 6:
            raise RuntimeError("crash after round 6")

    monkeypatch.setattr(skeleton, "_check_alive", crash)
    with pytest.raises(RuntimeError, match="crash after round 6"):
        run_experiment(cfg, options, tmp_path / "crashed", False, run_id="r1")
    monkeypatch.setattr(skeleton, "_check_alive", real)
    resumed = run_experiment(cfg, options, tmp_path / "crashed", False, run_id="r1",
                             resume=True)
    assert np.array_equal(clean.loop.params.numpy(), resumed.loop.params.numpy())
    for table in ("rounds", "clients", "peers", "events"):
        a, b = (read_table(r.log_dir, table) for r in (clean, resumed))
        keep = [c for c in a.column_names if "wall" not in c and c not in (
            "run_id", "client_updates_per_s", "pool_train_s")]
        assert _rows(a.select(keep)) == _rows(b.select(keep)), table
    assert [o["status"] for o in read_table(resumed.log_dir, "outcomes").to_pylist()] == [
        "completed"]


def _rows(table) -> list:
    import math

    rows = [tuple("nan" if isinstance(v, float) and math.isnan(v) else v
                  for v in row.values()) for row in table.to_pylist()]
    return sorted(rows, key=repr)


def test_a_pool_that_dies_past_the_bound_fails_the_run_in_one_line(tmp_path, ray_cluster):
    """max_restarts=0: the first dead pool ends the run, failed, the error naming the pool."""
    import threading

    from engine.backends.runtime import RuntimeOptions
    from engine.core.errors import PoolLost
    from engine.experiment import run_experiment
    from engine.resolve import load

    cfg = load(ROOT / "configs" / "quickstart.yaml", [*QUICK, "rounds=100000"])
    before = _pool_hosts()

    def kill_one():  # once rounds are logged: mid-run
        while not (hosts := _pool_hosts() - before) or not (
                tmp_path / "quickstart" / "rounds").is_dir():
            time.sleep(0.05)
        os.kill(min(hosts), signal.SIGKILL)

    threading.Thread(target=kill_one, daemon=True).start()
    with pytest.raises(PoolLost, match=r"^pool \d died .*more than the 0 restarts") as err:
        run_experiment(cfg, RuntimeOptions("ray", 2, max_restarts=0), tmp_path, False)
    assert "\n" not in str(err.value)
    (outcome,) = read_table(tmp_path / "quickstart", "outcomes").to_pylist()
    assert outcome["status"] == "failed" and "PoolLost" in outcome["error"]
