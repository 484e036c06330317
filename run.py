"""Concord command line: `python run.py <verb> ...` (a config path alone means `run`).

    python run.py configs/quickstart.yaml [key=value ...] [--backend inline] [--pools N]
    python run.py resume logs/<experiment> [--run-id ID]
    python run.py sweep configs/sweeps/topologies.yaml [key=value ...]
    python run.py analyze logs/<experiment>
    python run.py plugins [KIND]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from engine.core.errors import (
    ConfigError,
    Diverged,
    PoolDied,
    PoolLost,
    Terminated,
    on_signal,
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage)
        raise ConfigError(f"{self.prog}: {message}")


def _run_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run.py run", description="Run a scenario config (the verb `run` may be "
                "left out: `python run.py configs/quickstart.yaml`).")
    p.add_argument("config", help="YAML scenario, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds=50 seed=3")
    p.add_argument("--backend", choices=["ray", "inline"], default="ray")
    p.add_argument("--pools", type=int, help="client pools (default: one per cluster CPU)")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port)")
    p.add_argument("--log-dir", default="logs", help="root of the Arrow logs (default: logs)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="rounds between checkpoints (default: 50; 0: only at the start and "
                   "when a signal stops the run)")
    return p


def run_command(argv: list[str]) -> int:
    args = _run_parser().parse_intermixed_args(argv)
    if args.pools is not None and args.pools < 1:
        raise ConfigError("--pools: must be >= 1")
    _check_every(args.checkpoint_every)
    from engine.resolve import load

    cfg = load(args.config, args.overrides)  # every plugin resolved, before Ray starts
    from engine.records.logs import check_log_dir

    check_log_dir(Path(args.log_dir), cfg.experiment)  # nothing is created before it runs
    from engine.backends.runtime import RuntimeOptions
    from engine.experiment import run_experiment

    options = RuntimeOptions(args.backend, args.pools, args.address,
                             checkpoint_every=args.checkpoint_every)
    result = run_experiment(cfg, options, Path(args.log_dir), not args.no_progress)
    return _summary(cfg, result)


def _check_every(every: int) -> None:
    if every < 0:
        raise ConfigError("--checkpoint-every: must be >= 0 (0: at the start and on a stop)")


def resume_command(argv: list[str]) -> int:
    p = _Parser(prog="run.py resume", description="Continue a run that was killed or stopped "
                "from its last checkpoint; its logs then equal those of a run never stopped.")
    p.add_argument("log_dir", help="the experiment's folder, e.g. logs/quickstart")
    p.add_argument("--run-id", help="which run (default: the last one checkpointed)")
    p.add_argument("--backend", choices=["ray", "inline"], help="default: the run's own")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port)")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="rounds between checkpoints (default: 50)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    _check_every(args.checkpoint_every)
    from engine.experiment import resumable

    log_dir = Path(args.log_dir)
    run_id, meta = resumable(log_dir, args.run_id)
    from engine.core.config import build_config
    from engine.resolve import digest, resolve

    cfg = build_config(meta["config"])
    resolve(cfg)
    if digest(cfg) != meta["digest"]:
        raise ConfigError(f"run {run_id}: its config resolves differently with this code "
                          "(plugins' defaults changed?); it cannot be resumed bit for bit")
    from engine.backends.runtime import RuntimeOptions
    from engine.experiment import run_experiment

    options = RuntimeOptions(args.backend or meta["backend"], meta["pools"], args.address,
                             checkpoint_every=args.checkpoint_every)
    print(f"resuming run {run_id} ({log_dir})", file=sys.stderr)
    result = run_experiment(cfg, options, log_dir.parent, not args.no_progress, run_id,
                            meta["constants"] or None, resume=True)
    return _summary(cfg, result)


def _summary(cfg, result) -> int:
    loop = result.loop
    peers = cfg.mode == "decentralized"
    print(f"run {result.run_id}: {loop.rounds_done} rounds in {loop.wall_s:.1f} s "
          f"({result.updates_per_s:,.0f} {'peer' if peers else 'client'}-updates/s)")
    acting = result.metric == "test return"
    model = ("averaged model's test return" if acting else "averaged model") if peers \
        else result.metric
    digits = 1 if acting else 4
    print(f"  {model}: final {loop.final_accuracy:.{digits}f}, "
          f"best {loop.best_accuracy:.{digits}f}"
          + (f"; consensus distance {loop.consensus_distance:.4g}" if peers else ""))
    if result.store is not None:
        how = ("read from the cache" if result.store.built_s is None
               else f"built in {result.store.built_s:.1f} s, cached")
        print(f"  data: {how} ({result.store.path})")
    print(f"  logs: {result.log_dir}/  (python run.py analyze {result.log_dir})")
    return 0


def _analyze_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="run.py analyze", description="Summarize the runs under a log directory.")
    p.add_argument("log_dir", help="logs/<experiment> (or a sweep's directory)")
    p.add_argument("--group-by", default="", metavar="K1,K2",
                   help="one row per combination: mean and std over the other runs (seeds)")
    p.add_argument("--metric", default="", metavar="M1,M2", help="numeric summary columns")
    p.add_argument("--filter", action="append", default=[], metavar="K=V",
                   help="keep runs whose key equals V (repeatable)")
    p.add_argument("--target", type=float, default=0.8,
                   help="accuracy for rounds_to_target / vtime_to_target (default: 0.8)")
    p.add_argument("--format", choices=["table", "csv", "markdown"], default="table")
    p.add_argument("--plot", metavar="METRIC:X", help="e.g. accuracy:round -> PNG curves")
    p.add_argument("--heatmap", metavar="K1,K2", help="PNG of the first metric's mean")
    p.add_argument("--out", default="plots", help="folder for PNGs (default: plots)")
    p.add_argument("--sql", metavar="QUERY", help="DuckDB SQL over runs, rounds, clients, ...")
    p.add_argument("--rank", metavar="KEY", help="rank this key's values (systems) in every "
                   "scenario of --across and metric, then aggregate by Borda and Kemeny")
    p.add_argument("--across", metavar="KEY", help="the scenarios --rank ranks within")
    return p


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def analyze_command(argv: list[str]) -> int:
    args = _analyze_parser().parse_args(argv)
    from engine.analysis import summary as analysis

    log_dir, keys, metrics = Path(args.log_dir), _names(args.group_by), _names(args.metric)
    if args.sql:
        print(analysis.render(analysis.query(log_dir, args.sql), args.format))
        return 0
    runs = analysis.load_runs(log_dir, args.target)
    runs = analysis.filter_runs(runs, [analysis.parse_filter(f) for f in args.filter])
    if args.rank or args.across:
        if not (args.rank and args.across):
            raise ConfigError("--rank and --across go together: --rank KEY --across KEY")
        from engine.analysis import ranking

        metrics = metrics or ["final_accuracy"]
        analysis.check_metrics(runs.summary, metrics)
        print(ranking.render(ranking.rank_systems(runs, args.rank, args.across, metrics),
                             args.rank))
        return 0
    if args.plot or args.heatmap:
        from engine.analysis import plots

        if args.plot:
            print(plots.write_curves(log_dir, runs, args.plot, keys, Path(args.out)))
        if args.heatmap:
            metric = metrics[0] if metrics else "final_accuracy"
            print(plots.write_heatmap(runs, _names(args.heatmap), metric, Path(args.out)))
        return 0
    if keys:
        table = analysis.group_by(runs, keys, metrics or analysis.DEFAULT_METRICS)
    else:
        table = analysis.select_metrics(runs, metrics) if metrics else runs.summary
    print(analysis.render(table, args.format))
    return 0


def sweep_command(argv: list[str]) -> int:
    p = _Parser(prog="run.py sweep", description="Run a sweep file's runs (finished ones are "
                                                  "skipped).")
    p.add_argument("sweep", help="sweep file, e.g. configs/sweeps/topologies.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides of every run's base config")
    p.add_argument("--backend", choices=["ray", "inline"], default="ray",
                   help="inline: one run after another in this process")
    p.add_argument("--address", help="join an existing Ray cluster ('auto' or host:port)")
    p.add_argument("--max-concurrent", type=int, help="runs in flight (default: CPUs / share)")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="rounds between a run's checkpoints (default: 50); a run left "
                        "unfinished continues from its checkpoint when the sweep is rerun")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--log-dir", default="logs", help="root of the Arrow logs (default: logs)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_intermixed_args(argv)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError("--max-concurrent: must be >= 1")
    _check_every(args.checkpoint_every)
    from engine.sweeps.sweep import load_sweep

    sweep = load_sweep(args.sweep, args.overrides)  # every run checked before Ray starts
    from engine.records.logs import check_log_dir

    log_dir = check_log_dir(Path(args.log_dir), sweep.experiment) / sweep.experiment
    if args.dry_run:
        return _list_runs(sweep, log_dir)
    sweep.check()  # a refused run stops the sweep before the first run starts
    from engine.sweeps.scheduler import InlineRunner, RayRunner, run_sweep

    runner = (InlineRunner(sweep.cpus_per_run, args.checkpoint_every)
              if args.backend == "inline" else
              RayRunner(sweep.cpus_per_run, args.address, args.max_concurrent,
                        args.checkpoint_every))
    report = run_sweep(sweep, Path(args.log_dir), runner, args.retry_failed,
                       not args.no_progress)
    statuses = [o.status for o in report.outcomes]
    diverged = f"{statuses.count('diverged')} diverged, " if "diverged" in statuses else ""
    print(f"sweep {sweep.experiment}: {report.total} runs: {statuses.count('completed')} "
          f"completed, {diverged}{len(report.failed)} failed, {report.skipped} already finished; "
          f"{report.wall_s:.1f} s")
    print(f"  logs: {log_dir}/  (python run.py analyze {log_dir})")
    return 1 if report.failed else 0


def _list_runs(sweep, log_dir: Path) -> int:
    from engine.sweeps.sweep import finished_runs

    recorded = finished_runs(log_dir)
    status = ["refused" if run.refused else recorded.get(run.run_id, "pending")
              for run in sweep.runs]
    for run, state in zip(sweep.runs, status, strict=True):
        why = f"  -- {run.refused}" if run.refused else \
            "".join(f"  -- note: {n}" for n in run.notes)
        print(f"{run.run_id}  {state:<11} {run.label()}{why}")
    done, failed, refused = (status.count(s) for s in ("completed", "failed", "refused"))
    print(f"{len(sweep.runs)} runs: {done} completed, {failed} failed, "
          f"{len(status) - done - failed - refused} to run"
          + (f", {refused} refused (the sweep will not start)" if refused else ""))
    return 2 if refused else 0


def plugins_command(argv: list[str]) -> int:
    p = _Parser(prog="run.py plugins", description="List every pluggable kind's registered "
                "plugins with their parameters and defaults, then the compatibility matrix "
                "of every protocol against every plugin and world model (checked by the "
                "engine, about 20 s).")
    p.add_argument("kind", nargs="?", help="one kind only, e.g. topology (no matrix)")
    p.add_argument("--matrix", action="store_true", help="print the compatibility matrix only")
    p.add_argument("--write-matrix", metavar="PATH", help="write the matrix as Markdown "
                   "(docs/COMPATIBILITY.md) instead of printing it")
    args = p.parse_args(argv)
    if args.kind and (args.matrix or args.write_matrix):
        raise ConfigError("plugins: a kind lists that kind's plugins; --matrix covers them all")
    from engine.contracts import CHECKERS
    from engine.core.plugins import describe_registry

    kinds = [args.kind] if args.kind else list(CHECKERS)
    if args.kind and args.kind not in CHECKERS:
        raise ConfigError(f"plugins: unknown kind {args.kind!r}; allowed: "
                          f"{', '.join(CHECKERS)}")
    if not (args.write_matrix or args.matrix):
        for kind in kinds:
            print(f"{kind}:")
            for line in describe_registry(CHECKERS[kind][0]):
                print(f"  {line}")
    if args.kind:
        return 0
    from engine import compatibility

    print("checking every protocol against every plugin ...", file=sys.stderr, flush=True)
    m = compatibility.matrix()
    if args.write_matrix:
        Path(args.write_matrix).write_text(compatibility.render(m) + "\n")
        allowed, refused, na = m.counts()
        print(f"wrote {args.write_matrix}: {allowed} cells run, {refused} refused, "
              f"{na} not applicable")
    else:
        print(("" if args.matrix else "\n") + "compatibility (docs/COMPATIBILITY.md):")
        print(compatibility.render_text(m))
    return 0


def _stop_ray() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


VERBS = {
    "run": (run_command, "run a scenario config: run [config.yaml] [key=value ...]"),
    "resume": (resume_command, "continue a killed or stopped run from its last checkpoint"),
    "sweep": (sweep_command, "run a sweep file's pending runs (finished ones are skipped)"),
    "analyze": (analyze_command, "summarize, group, filter, plot or query an experiment's logs"),
    "plugins": (plugins_command, "list the registered plugins of every kind, with parameters"),
}


def _help() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: python run.py <verb> [arguments]   (a config path alone means `run`)", "",
             "verbs:"]
    lines += [f"  {verb:<{width}}  {text}" for verb, (_, text) in VERBS.items()]
    lines += ["", "`python run.py <verb> --help` describes a verb's arguments."]
    return "\n".join(lines)


class _Stderr(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr, flush=True)  # today's sys.stderr


def _announce_data_builds() -> None:
    """The client data store says on stderr when a build takes a while (it can take
    minutes)."""
    log = logging.getLogger("scenarios.store")
    if not log.handlers:
        log.addHandler(_Stderr())
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _announce_data_builds()
    for signum in (signal.SIGINT, signal.SIGTERM):  # the round ends, a checkpoint, then stop
        signal.signal(signum, on_signal)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(_help())
            return 0 if argv else 2
        if argv[0] in VERBS:
            return VERBS[argv[0]][0](argv[1:])
        return run_command(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"diverged: {err}; the rows up to it are in the log directory", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        _stop_ray()  # its raylet, GCS, workers and agents go with the run
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"{what}: the run's outcome is recorded as interrupted; rows already flushed are "
              "kept in the log directory", file=sys.stderr)
        for command in getattr(err, "__notes__", []):  # engine/experiment.py adds it
            print(f"  to continue it: {command}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except (PoolLost, PoolDied) as err:  # PoolDied: before the run's first checkpoint
        print(f"error: {err}; rows already flushed are kept in the log directory",
              file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a log folder removed under the run, ...
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}{where}; "
              "rows already flushed are kept in the log directory", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
