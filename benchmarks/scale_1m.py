"""configs/scale_1m.yaml at 1,000,000 clients against the same config at 10,000, as a user runs
them (`run.py`, real subprocesses): training seconds per round, total wall, and the peak
memory of each process tree (Ray workers included), with the client data store's build time
and its reuse from the cache.

    python benchmarks/scale_1m.py [--clients 1000000] [--small 10000] [--rounds 30]

Each size runs twice from an empty private cache: the first run builds the store, the second
reads it. Run it alone: it uses both cores, about 20 GB of disk and up to 20 GB of memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.w3 import measured  # noqa: E402


def command(clients: int, rounds: int, logs: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), str(ROOT / "configs" / "scale_1m.yaml"),
            f"population.num_clients={clients}", f"rounds={rounds}", "--no-progress",
            "--log-dir", logs, "--checkpoint-every", "0"]


def train_seconds(logs: str) -> float:
    """Median training seconds of rounds 2.. (the round's wall less its evaluation)."""
    from engine.records.logs import read_table

    rounds = read_table(Path(logs) / "scale_1m", "rounds").sort_by("round")
    wall = rounds["round_wall_s"].to_numpy()
    evaluated = rounds["eval_wall_s"].to_numpy(zero_copy_only=False)
    spent = wall - np.nan_to_num(evaluated.astype(np.float64))
    return float(np.median(spent[1:]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1_000_000)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    rows = {}
    for clients in (args.small, args.clients):
        cache = tempfile.mkdtemp(prefix="scale-data-")
        env = {**os.environ, "CONCORD_DATA_CACHE": cache}
        try:
            for run in ("build", "cached"):
                with tempfile.TemporaryDirectory() as logs:
                    wall, pss, rss, out = measured(command(clients, args.rounds, logs), env)
                    rows[clients, run] = (train_seconds(logs), wall, pss, rss)
                print(f"  {clients:>9,} clients, {run:<6}: {rows[clients, run][0]:.3f} s/round, "
                      f"{wall:.1f} s wall, peak PSS {pss / 2**30:.2f} GB (RSS sum "
                      f"{rss / 2**30:.2f} GB); " + next(
                          (line.strip() for line in out.splitlines() if "data:" in line), ""),
                      flush=True)
            store = sum(f.stat().st_size for f in Path(cache).rglob("*") if f.is_file())
            print(f"  {clients:>9,} clients: store {store / 1e9:.2f} GB on disk", flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    small, big = rows[args.small, "cached"], rows[args.clients, "cached"]
    print(f"scale_1m: {args.clients:,} vs {args.small:,} clients, 1000 a round, "
          f"{args.rounds} rounds (runs reading the cached store)")
    print(f"  training seconds per round (2..)  {small[0]:.3f} s  {big[0]:.3f} s  "
          f"{big[0] / small[0]:.2f}x")
    print(f"  peak memory, process tree (PSS)   {small[2] / 2**30:.2f} GB  "
          f"{big[2] / 2**30:.2f} GB")
    print(f"  building the store (first run)    wall {rows[args.small, 'build'][1]:.1f} s  "
          f"{rows[args.clients, 'build'][1]:.1f} s, peak PSS "
          f"{rows[args.small, 'build'][2] / 2**30:.2f} GB  "
          f"{rows[args.clients, 'build'][2] / 2**30:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
