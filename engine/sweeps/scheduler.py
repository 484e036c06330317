"""Runs a sweep's pending runs, concurrently on Ray (or one by one in-process).

Each run is one Ray task that holds its share of the cluster (`cpus_per_run`) and runs the
ordinary `run_experiment` inside it:
- a 1-CPU share runs its pools inline in the task's worker. Ray reuses task workers, so
  torch is imported once per worker, not once per run, and no pool actors start;
- a k-CPU share gets a placement group of k 1-CPU bundles; the run's k pool actors are
  placed in it, and the task itself asks for no CPU (its driver mostly waits on the pools).
At most (cluster CPUs / share) runs are in flight. A run that fails is recorded in the
`outcomes` table with its error and the sweep goes on. A run left unfinished (the sweep was
killed or stopped) continues from its checkpoint when the sweep is run again, as
`run.py resume` would continue it. Why not Ray Tune: see
docs/ARCHITECTURE.md (benchmarks/sweep_scheduler.py measures it).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from engine.backends.runtime import RuntimeOptions, connect_ray, drop_kept_hosts
from engine.core.errors import Diverged
from engine.records.logs import TABLES, RunLogger, error_line, outcome_row
from engine.records.progress import SweepProgress
from engine.sweeps.sweep import RunSpec, Sweep, pending


@dataclass(frozen=True)
class RunOutcome:
    run: RunSpec
    status: str  # completed | failed | diverged
    error: str | None
    final_accuracy: float
    wall_s: float
    resumed: bool = False  # continued from an earlier attempt's checkpoint


def execute_run(run: RunSpec, log_root: Path, options: RuntimeOptions) -> RunOutcome:
    """One run of a sweep. An earlier, unfinished attempt with a checkpoint this run can use
    is continued from it (the logs then equal an uninterrupted run's); otherwise the run
    starts from a clean slate (that attempt's rows are removed first). An exception becomes a
    `failed` outcome, recorded, not raised."""
    from engine.experiment import run_experiment

    log_dir = Path(log_root) / run.config.experiment
    pools = resumable_pools(log_dir, run, options)
    if pools is None:
        clear_run(log_dir, run.run_id)
    else:  # the checkpoint's own pool layout (results do not depend on it)
        options = replace(options, pools=pools)
    start = time.perf_counter()
    try:
        result = run_experiment(run.config, options, log_root, False, run.run_id, run.constants,
                                show_notes=False,  # --dry-run lists them
                                resume=pools is not None)
    except Diverged as err:  # an outcome of the simulation, recorded by run_experiment
        return RunOutcome(run, "diverged", error_line(err), math.nan, time.perf_counter() - start)
    except Exception as err:
        record_failure(run, log_dir, options, err)
        return RunOutcome(run, "failed", error_line(err), math.nan, time.perf_counter() - start)
    return RunOutcome(run, "completed", None, result.loop.final_accuracy,
                      time.perf_counter() - start, pools is not None)


def resumable_pools(log_dir: Path, run: RunSpec, options: RuntimeOptions) -> int | None:
    """The number of pools of `run`'s checkpoint, if this attempt can continue from it: the
    same config as resolved now (its digest) and no more pools than the run's share holds.
    None: start afresh (no checkpoint, an unreadable one, or one of other code)."""
    from engine.experiment import checkpoint_meta
    from engine.resolve import digest

    meta = checkpoint_meta(log_dir, run.run_id)
    if meta is None or meta.get("digest") != digest(run.config) or meta.get("run_id") != run.run_id:
        return None
    return meta["pools"] if meta["pools"] <= (options.pools or 1) else None


def clear_run(log_dir: Path, run_id: str) -> None:
    """Remove what an earlier attempt of run `run_id` left: its rows and its checkpoint."""
    for name in [name for name, _ in TABLES.values()] + ["checkpoints"]:
        shutil.rmtree(log_dir / name / f"run_id={run_id}", ignore_errors=True)


def record_failure(run: RunSpec, log_dir: Path, options: RuntimeOptions,
                   err: BaseException) -> None:
    """Make sure a failed run has its runs row and a `failed` outcome, whether it died before
    its logger existed (a bad world or policy parameter), or its worker died with it."""
    from engine.experiment import run_row

    logger = RunLogger(log_dir, run.run_id, constants=run.constants)
    if not (log_dir / "runs" / f"run_id={run.run_id}").is_dir():
        logger.append(run_row(run.config, options, None, None, datetime.now(UTC)))
    if not (log_dir / "outcomes" / f"run_id={run.run_id}").is_dir():
        logger.append(outcome_row("failed", error_line(err), 0, math.nan))
    logger.flush()


class InlineRunner:
    """One run after another in this process (debugging; no Ray)."""

    slots = running = 1

    def __init__(self, cpus_per_run: int, checkpoint_every: int = 50) -> None:
        self.options = RuntimeOptions("inline", cpus_per_run, checkpoint_every=checkpoint_every)

    def run(self, runs: list[RunSpec], log_root: Path) -> Iterator[RunOutcome]:
        for run in runs:
            yield execute_run(run, log_root, self.options)


class RayRunner:
    """Runs as Ray tasks, each holding `cpus_per_run` CPUs; yields outcomes as runs finish."""

    def __init__(self, cpus_per_run: int, address: str | None,
                 max_concurrent: int | None, checkpoint_every: int = 50) -> None:
        import ray

        self._ray, self.cpus_per_run = ray, cpus_per_run
        self.checkpoint_every = checkpoint_every
        cpus = connect_ray(address)
        drop_kept_hosts()  # idle pool actors kept by this process would hold the runs' CPUs
        if cpus_per_run > cpus:
            from engine.core.errors import ConfigError

            raise ConfigError(f"cpus_per_run: {cpus_per_run} is more than the cluster's "
                              f"{cpus} CPUs")
        self.slots = max_concurrent or max(1, cpus // cpus_per_run)
        self._task = ray.remote(_remote_run)
        self.running = 0

    def run(self, runs: list[RunSpec], log_root: Path) -> Iterator[RunOutcome]:
        queue, in_flight = list(runs), {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < self.slots:
                    run = queue.pop(0)
                    ref, group = self._submit(run, log_root)
                    in_flight[ref] = (run, group)
                self.running = len(in_flight)
                ready, _ = self._ray.wait(list(in_flight), num_returns=1)
                run, group = in_flight.pop(ready[0])
                self.running = len(in_flight)
                yield self._collect(ready[0], run, group, log_root)
        finally:
            for ref, (_, group) in in_flight.items():
                self._ray.cancel(ref)
                self._release(group)

    def _submit(self, run: RunSpec, log_root: Path):
        k = self.cpus_per_run
        if k == 1:
            options = RuntimeOptions("inline", 1, checkpoint_every=self.checkpoint_every)
            return self._task.options(num_cpus=1).remote(run, str(log_root), options), None
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"CPU": 1}] * k, strategy="PACK")
        strategy = PlacementGroupSchedulingStrategy(group,
                                                    placement_group_capture_child_tasks=True)
        options = RuntimeOptions("ray", k, cpus=k, checkpoint_every=self.checkpoint_every)
        ref = self._task.options(num_cpus=0, scheduling_strategy=strategy).remote(
            run, str(log_root), options)
        return ref, group

    def _collect(self, ref, run: RunSpec, group, log_root: Path) -> RunOutcome:
        try:
            return self._ray.get(ref)
        except Exception as err:  # the worker died (e.g. out of memory): record it here
            log_dir = Path(log_root) / run.config.experiment
            record_failure(run, log_dir, RuntimeOptions(), err)
            return RunOutcome(run, "failed", error_line(err), math.nan, math.nan)
        finally:
            self._release(group)

    def _release(self, group) -> None:
        if group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(group)


def _remote_run(run: RunSpec, log_root: str, options: RuntimeOptions) -> RunOutcome:
    import torch

    torch.set_num_threads(1)  # one thread per held CPU: 2 cores oversubscribed train ~20x slower
    return execute_run(run, Path(log_root), options)


@dataclass(frozen=True)
class SweepReport:
    total: int  # runs in the sweep
    skipped: int  # already finished before this invocation
    outcomes: list[RunOutcome]
    wall_s: float

    @property
    def failed(self) -> list[RunOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def run_sweep(sweep: Sweep, log_root: Path, runner: InlineRunner | RayRunner,
              retry_failed: bool = False, show_progress: bool = True) -> SweepReport:
    """Run what is pending of `sweep` under log_root/<experiment>/; finished runs are
    skipped (failed ones too, unless retried). A sweep with a run the engine refuses does not
    start."""
    sweep.check()
    start = time.perf_counter()
    todo = pending(sweep, Path(log_root) / sweep.experiment, retry_failed)
    progress = SweepProgress(len(todo), len(sweep.runs) - len(todo), show_progress)
    progress.running(min(runner.slots, len(todo)))
    outcomes = []
    try:
        for outcome in runner.run(todo, log_root):
            outcomes.append(outcome)
            progress.finished(_line(outcome), outcome.status == "failed", runner.running)
    finally:
        progress.close()
    return SweepReport(len(sweep.runs), len(sweep.runs) - len(todo), outcomes,
                       time.perf_counter() - start)


def _line(outcome: RunOutcome) -> str:
    head = f"{outcome.run.run_id} [{outcome.run.label()}]"
    if outcome.status in ("failed", "diverged"):
        return f"  {outcome.status:<9} {head}: {outcome.error}"
    resumed = ", resumed from its checkpoint" if outcome.resumed else ""
    return (f"  completed {head}: accuracy {outcome.final_accuracy:.4f} "
            f"({outcome.wall_s:.1f} s{resumed})")
