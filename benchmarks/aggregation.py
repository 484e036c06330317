"""Holistic aggregation: chunks as parallel Ray tasks vs the same rule in one process.

    python benchmarks/aggregation.py                      # K=1000 clients, P=1M parameters
    python benchmarks/aggregation.py --clients 200 --params 200000 --repeats 3

For each rule, times the single-process computation (serial chunk map in this process) and
the parallel one (RayChunkMap: the stack goes to the object store once, each of the cluster's
CPUs takes a contiguous group of column chunks), checks the two results are identical, and
prints the speed-up ratio single / parallel. The put into the object store is inside the
parallel time (after one warm-up put of the same size). Medians over --repeats alternating runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import ray
import torch

from engine.backends.runtime import RayChunkMap, connect_ray
from engine.compute.training import pin_torch_arithmetic
from engine.core import parallel
from engine.core.updates import Updates
from policies.robust import coordinate_median, krum, trimmed_mean

RULES = {"median": coordinate_median, "trimmed_mean": trimmed_mean, "krum": krum}


def stack(k: int, p: int) -> Updates:
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(k, p, generator=g)
    return Updates(deltas, torch.ones(k), torch.arange(k), torch.zeros(k),
                   torch.ones(k, dtype=torch.int64))


def timed(rule, updates: Updates, mapper) -> tuple[float, torch.Tensor]:
    agg = rule()
    state = agg.init(torch.zeros(updates.deltas.shape[1]))
    with parallel.chunk_map(mapper):
        start = time.perf_counter()
        out, _ = agg.update(updates, state)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--rules", default=",".join(RULES))
    args = ap.parse_args()
    pin_torch_arithmetic()
    cpus = connect_ray(None)
    updates = stack(args.clients, args.params)
    print(f"K={args.clients} P={args.params:,} ({updates.deltas.numel() * 4 / 2**30:.1f} GiB), "
          f"{cpus} CPUs, chunks of {parallel.CHUNK_COLUMNS} columns")
    # Start the task workers, and have the object store touch the stack's pages once: the
    # first put of a fresh multi-GB object pays page faults that later rounds do not.
    timed(krum, stack(8, 4 * parallel.CHUNK_COLUMNS), RayChunkMap(cpus, 0))
    del_ref = ray.put(updates.deltas.numpy())
    del del_ref
    for name in args.rules.split(","):
        single, par = [], []
        for _ in range(args.repeats):
            t_single, ref = timed(RULES[name], updates, parallel.serial_map)
            t_par, out = timed(RULES[name], updates, RayChunkMap(cpus, min_elements=0))
            single.append(t_single)
            par.append(t_par)
        s, p = statistics.median(single), statistics.median(par)
        print(f"{name:14s} single {s:7.2f} s   parallel {p:7.2f} s   "
              f"ratio {s / p:.2f}x   identical {torch.equal(ref, out)}", flush=True)


if __name__ == "__main__":
    main()
