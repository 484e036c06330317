"""Checkpoints on W1: what they cost next to a round, and how long a dead pool takes to replace.

Workload: configs/w1.yaml (benchmarks/w1.py) on the Ray backend, `--rounds` rounds.
1. Cost. Runs with a checkpoint after every round and runs with none but the start's, in turn,
   `--repeats` times. Each checkpoint is timed where it is written (the pools' snapshots, the
   logger's flush, the pickle and the atomic write); the round time is the steady-state
   (rounds >= `--warmup`) time per round of the runs without. Prints the cost of a checkpoint as a
   fraction of the rounds it covers at `--checkpoint-every` 50 (the default), and, as a check,
   the slowdown of the every-round runs over the others.
2. Restart. One run whose pool actor is SIGKILLed (found by pid) at 5/8 of `--restart-rounds`: the
   seconds the replacement took (its `pool_restart` event: new actor and restore), and the
   extra wall time of the run over a clean one (restart plus the replayed rounds).

    python benchmarks/checkpoints.py [--pools N] [--rounds R] [--repeats K] [--restart-rounds R]
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from common import parser  # benchmarks/common.py (the script's folder)

from engine.backends.runtime import RuntimeOptions
from engine.core.config import load_config
from engine.experiment import run_experiment
from engine.loops import keeper
from engine.records.logs import read_table

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "w1.yaml"
DEFAULT_EVERY = RuntimeOptions().checkpoint_every


class SaveTimer:
    """Times every Keeper.save from its creation on: `seconds`, and the last file's `size`."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.size = 0
        save = keeper.Keeper.save

        def timed(kept, loop, tally):
            start = time.perf_counter()
            save(kept, loop, tally)
            self.seconds.append(time.perf_counter() - start)
            self.size = kept.path.stat().st_size

        keeper.Keeper.save = timed


def run(cfg, pools, every: int, warmup: int) -> tuple[float, float, object]:
    """One run: its steady-state seconds per round and its whole wall time, and its events."""
    with tempfile.TemporaryDirectory() as logs:
        start = time.perf_counter()
        run_experiment(cfg, RuntimeOptions("ray", pools, checkpoint_every=every), Path(logs),
                       False)
        whole = time.perf_counter() - start
        rounds = read_table(Path(logs) / cfg.experiment, "rounds").sort_by("round")
        events = read_table(Path(logs) / cfg.experiment, "events")
    wall = rounds["wall_time_s"].to_numpy()
    per_round = (wall[-1] - wall[warmup - 1]) / (len(wall) - warmup)
    return per_round, whole, events


def pool_hosts() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::PoolHost"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def kill_a_pool_at(logs: Path, experiment: str, at_round: int) -> None:
    """In a thread: once round `at_round` is logged (its rounds row), SIGKILL one pool actor."""
    before = pool_hosts()

    def watch():
        while True:
            try:
                done = read_table(logs / experiment, "rounds").num_rows
            except Exception:
                done = 0
            hosts = pool_hosts() - before
            if hosts and done >= at_round:
                os.kill(min(hosts), signal.SIGKILL)
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    p = parser(__doc__, repeats=3)
    p.set_defaults(rounds=40)
    p.add_argument("--restart-rounds", type=int, default=200,
                   help="rounds of the run whose pool is killed (at half-way)")
    args = p.parse_args()
    cfg = load_config(CONFIG, [f"rounds={args.rounds}"])
    saves = SaveTimer()
    with_every, without = [], []
    for i in range(args.repeats):
        saves.seconds.clear()
        per_round_1, _, _ = run(cfg, args.pools, 1, args.warmup)
        save_s = float(np.median(saves.seconds[1:]))  # the start's checkpoint left out
        per_round_0, _, _ = run(cfg, args.pools, 0, args.warmup)
        with_every.append((per_round_1, save_s))
        without.append(per_round_0)
        print(f"  repeat {i + 1}: round {per_round_0 * 1e3:6.1f} ms without checkpoints, "
              f"{per_round_1 * 1e3:6.1f} ms with one every round; a checkpoint "
              f"{save_s * 1e3:5.1f} ms ({saves.size / 1e6:.2f} MB)")
    round_s = float(np.median(without))
    save_s = float(np.median([s for _, s in with_every]))
    slowdown = float(np.median([r for r, _ in with_every])) / round_s - 1
    print(f"W1, {args.rounds} rounds, median of {args.repeats}: a round {round_s * 1e3:.1f} ms, "
          f"a checkpoint {save_s * 1e3:.1f} ms")
    print(f"  checkpoint cost / round time at --checkpoint-every {DEFAULT_EVERY}: "
          f"{save_s / (DEFAULT_EVERY * round_s):.2%}   (every round: {save_s / round_s:.1%}; "
          f"measured slowdown of every-round runs: {slowdown:+.1%})")

    # 2. restart: a clean run, then one whose pool dies at mid-run
    rounds = args.restart_rounds
    cfg = load_config(CONFIG, [f"rounds={rounds}"])
    _, clean_s, _ = run(cfg, args.pools, DEFAULT_EVERY, args.warmup)
    at = rounds * 5 // 8  # between two checkpoints (every 50)
    with tempfile.TemporaryDirectory() as logs:
        kill_a_pool_at(Path(logs), cfg.experiment, at)
        start = time.perf_counter()
        run_experiment(cfg, RuntimeOptions("ray", args.pools), Path(logs), False)
        killed_s = time.perf_counter() - start
        events = read_table(Path(logs) / cfg.experiment, "events")
    restarts = events.filter(pc.equal(events["kind"], "pool_restart"))
    (restart_s,) = restarts["value"].to_pylist()
    (since,) = restarts["round"].to_pylist()
    print(f"  a pool SIGKILLed after round {at} of {rounds}: replaced in {restart_s:.2f} s "
          f"(new actor + restore), replayed from round {since}; the run took "
          f"{killed_s - clean_s:+.2f} s over a clean one ({clean_s:.1f} s)")


if __name__ == "__main__":
    main()
