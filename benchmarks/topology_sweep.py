"""Issue 6's bar: the shipped topology sweep (36 runs) on this machine, timed, and whether its
consensus distances order the topologies as their spectral gaps predict.

Runs configs/sweeps/topologies.yaml into a fresh log directory on Ray (1 CPU per run), then
prints: the sweep's wall time; the sum of the runs' own wall times over the sweep's wall
(the concurrency actually obtained); per size, each topology's mean spectral gap (runs table)
and mean consensus distance over rounds >= --burn-in (rounds table), sorted by gap; and the
number of pairs the distances order against the gaps (0 = the predicted order).

    python benchmarks/topology_sweep.py [--log-dir /tmp/topology-sweep] [--burn-in 10]
"""

from __future__ import annotations

import argparse
import shutil
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from engine.records.logs import read_table
from engine.sweeps.scheduler import RayRunner, run_sweep
from engine.sweeps.sweep import load_sweep

SWEEP = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "topologies.yaml"


def by_group(table, column: str) -> dict[tuple[int, str], float]:
    found: dict[tuple[int, str], list[float]] = {}
    for peers, kind, value in zip(table["peers"].to_pylist(), table["topology.kind"].to_pylist(),
                                  table[column].to_pylist(), strict=True):
        found.setdefault((peers, kind), []).append(value)
    return {key: float(np.mean(values)) for key, values in found.items()}


def inversions(rows: list[tuple[str, float, float]]) -> int:
    """Pairs whose larger spectral gap does not come with a smaller consensus distance."""
    return sum((g1 - g2) * (d1 - d2) >= 0 and g1 != g2
               for (_, g1, d1), (_, g2, d2) in combinations(rows, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--log-dir", default="/tmp/topology-sweep")
    p.add_argument("--burn-in", type=int, default=10)
    args = p.parse_args()
    root = Path(args.log_dir)
    shutil.rmtree(root, ignore_errors=True)
    sweep = load_sweep(SWEEP)
    runner = RayRunner(sweep.cpus_per_run, None, None)
    start = time.perf_counter()
    report = run_sweep(sweep, root, runner, show_progress=False)
    wall = time.perf_counter() - start
    busy = sum(o.wall_s for o in report.outcomes)
    print(f"{len(report.outcomes)} runs ({len(report.failed)} failed) in {wall:.1f} s "
          f"({runner.slots} in flight); runs' own walls sum to {busy:.1f} s: "
          f"{busy / wall:.2f}x concurrency")
    log_dir = root / sweep.experiment
    gaps = by_group(read_table(log_dir, "runs", constants=True), "spectral_gap")
    rounds = read_table(log_dir, "rounds", constants=True)
    distance = by_group(rounds.filter(np.asarray(rounds["round"]) >= args.burn_in),
                        "consensus_distance")
    for peers in sorted({n for n, _ in gaps}):
        rows = sorted(((k, gaps[n, k], distance[n, k]) for n, k in gaps if n == peers),
                      key=lambda row: row[1])
        print(f"{peers} peers: " + ", ".join(f"{k} gap {g:.3f} dist {d:.4f}" for k, g, d in rows))
        print(f"  pairs out of the spectral-gap order: {inversions(rows)} of "
              f"{len(rows) * (len(rows) - 1) // 2}")


if __name__ == "__main__":
    main()
