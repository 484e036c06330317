"""Where a W1 round's time goes (issue 28): the engine as a user runs it (Ray, 2 pools), read
back from its logs, and inside a pool, each step of its `train` call timed in-process.

    python benchmarks/w1_profile.py [--executor vmap|fused] [--rounds 40]

Prints medians in milliseconds per round (rounds after the first 5). Run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.backends.runtime import RuntimeOptions  # noqa: E402
from engine.compute.pool import ClientPool, PoolResult, finite_rows  # noqa: E402
from engine.compute.training import batch_plan, step_budget, step_budgets  # noqa: E402
from engine.core.updates import Updates  # noqa: E402
from engine.experiment import prepare, run_experiment  # noqa: E402
from engine.records.logs import read_table  # noqa: E402
from engine.resolve import load  # noqa: E402


def from_logs(cfg) -> dict[str, float]:
    """The engine's round, from its own logs: the loop's time a round, of which the
    driver's pools.train call, the slower pool's call as the pool timed it, the aggregation,
    the rest of the round, and what the loop does after it (records, progress, checks)."""
    with tempfile.TemporaryDirectory() as logs:
        run_experiment(cfg, RuntimeOptions("ray", 2), Path(logs), False)
        rounds = read_table(Path(logs) / "w1", "rounds").sort_by("round").slice(5)
        clients = read_table(Path(logs) / "w1", "clients").to_pydict()
    slowest: dict[int, float] = {}
    for r, s in zip(clients["round"], clients["pool_train_s"], strict=True):
        if r >= 5 and s is not None:
            slowest[r] = max(slowest.get(r, 0.0), s)

    def med(name):
        return float(np.median(rounds[name].to_numpy(zero_copy_only=False).astype(float)))

    train, agg, wall = med("train_wall_s"), med("aggregate_wall_s"), med("round_wall_s")
    pool = float(np.median(list(slowest.values())))
    loop = float(np.median(np.diff(rounds["wall_time_s"].to_numpy())))
    return {"a round of the loop (from one round's end to the next)": loop,
            "  records, progress, checks (after the round)": loop - wall,
            "  round (driver's wall)": wall, "    pools.train call (driver)": train,
            "      slower pool's own train call": pool,
            "      Ray dispatch, transfer, result (the difference)": train - pool,
            "    aggregation (tree total, FedAvg, model update)": agg,
            "    planning (the rest of the round)": wall - train - agg}


def in_pool(cfg, rounds: int) -> dict[str, float]:
    """One pool's train call for 50 clients, step by step, in this process (one thread)."""
    torch.set_num_threads(1)
    parts = prepare(cfg)
    pool = ClientPool(parts.spec, parts.task.shard(0, parts.task.num_clients))
    t, rng = pool.trainer, np.random.default_rng(0)
    times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def timed(name):
        start = time.perf_counter()
        yield
        times.setdefault(name, []).append(time.perf_counter() - start)

    for r in range(rounds):
        ids = np.sort(rng.choice(parts.task.num_clients, 50, replace=False))
        ids_t, counts = torch.from_numpy(ids), t.shard.sizes(ids)
        t._last = None  # read this round's rows afresh
        with timed("read the clients' rows"):
            x, y, first = t.rows(ids)
        with timed("batch plan (shuffle, budgets)"):
            plan = step_budget(batch_plan(t.seeds.client_keys("shuffle", r, ids), first, counts,
                                          t.spec.hp), step_budgets(t.spec.hp, t.seeds, ids, r))
        with timed("executor (local SGD)"):
            out = t.executor(parts.params, x, y, plan, t.spec.hp)
        with timed("finite check, label counts"):
            finite_rows(out.deltas)
            t.label_counts(ids)
        with timed("weighted partial sums (id tree)"):
            sums = t.partial_sums(out.deltas * torch.from_numpy(counts.astype(np.float32))[:, None],
                                  ids_t)
        updates = Updates(deltas=None, weights=torch.from_numpy(counts.astype(np.float32)),
                          client_ids=ids_t, losses=out.losses,
                          num_samples=torch.from_numpy(counts), weighted_sums=sums)
        with timed("result pickled (as Ray ships it)"):
            pickle.dumps(PoolResult(updates, torch.zeros(50), 0.0), protocol=5)
    return {name: float(np.median(v[5:])) for name, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--executor", default="vmap")
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    cfg = load(ROOT / "configs" / "w1.yaml", [f"rounds={args.rounds}", "eval_every=0",
                                              f"training.executor={args.executor}"])
    print(f"W1 round, {args.executor} executor, medians of rounds 5..{args.rounds - 1}, ms:")
    for name, s in from_logs(cfg).items():
        print(f"  {name:<60}{s * 1e3:7.1f}")
    print("inside a pool's train call (50 clients, 1 thread, in-process):")
    for name, s in in_pool(cfg, args.rounds).items():
        print(f"  {name:<60}{s * 1e3:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
