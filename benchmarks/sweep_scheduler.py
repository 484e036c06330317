"""Ray Tune vs Concord's plain Ray scheduler on the same sweep runs, in one process.

Both run the same list of runs of a sweep file (default: the shipped topology sweep, first
--runs runs), each run on 1 CPU with its pools inline, at most (CPUs) in flight, into two
fresh log directories; Tune with actor reuse on, its console output off. Prints both walls and
the ratio. Needs `pip install "ray[tune]"` (not a Concord dependency).

    python benchmarks/sweep_scheduler.py [--sweep configs/sweeps/topologies.yaml] [--runs 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from engine.backends.runtime import RuntimeOptions, connect_ray
from engine.sweeps.scheduler import RayRunner, execute_run, run_sweep
from engine.sweeps.sweep import Sweep, load_sweep


def plain(sweep: Sweep, root: Path) -> float:
    start = time.perf_counter()
    report = run_sweep(sweep, root, RayRunner(1, None, None), show_progress=False)
    assert not report.failed, report.failed[0].error
    return time.perf_counter() - start


def tuned(sweep: Sweep, root: Path, cpus: int) -> float:
    from ray import tune

    runs = sweep.runs

    def trainable(config):
        import torch

        torch.set_num_threads(1)
        outcome = execute_run(runs[config["index"]], root, RuntimeOptions("inline", 1))
        return {"accuracy": outcome.final_accuracy}

    start = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"index": tune.grid_search(list(range(len(runs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=cpus, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(root / "tune"), verbose=0),
    )
    results = tuner.fit()
    assert not results.errors, results.errors
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="configs/sweeps/topologies.yaml")
    p.add_argument("--runs", type=int, default=24)
    args = p.parse_args()
    full = load_sweep(args.sweep)
    sweep = Sweep(full.experiment, full.runs[: args.runs], 1, full.columns)
    cpus = connect_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        plain(sweep, Path(tmp) / "warm")  # start the task workers once for both
        t_plain = plain(sweep, Path(tmp) / "plain")
        t_tune = tuned(sweep, Path(tmp) / "tuned", cpus)
    print(f"{len(sweep.runs)} runs of {args.sweep}, {cpus} CPUs, 1 CPU per run")
    print(f"  plain Ray scheduler: {t_plain:6.1f} s")
    print(f"  Ray Tune           : {t_tune:6.1f} s")
    print(f"  Tune / plain       : {t_tune / t_plain:.2f}x")


if __name__ == "__main__":
    main()
