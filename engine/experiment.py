"""Wire one experiment: config -> task + world -> pools -> round loop -> Arrow logs."""

from __future__ import annotations

import io
import json
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from engine.backends.runtime import RuntimeOptions
from engine.compute.evaluation import task_evaluator, validation_scorer
from engine.compute.pool import PoolSpec
from engine.compute.training import LocalSGD, pin_torch_arithmetic
from engine.core.checkpoint import write_atomic
from engine.core.config import ExperimentConfig
from engine.core.errors import ConfigError, Diverged
from engine.core.params import ParamSpec, init_params
from engine.core.seeds import SeedTree
from engine.loops.keeper import Keeper, checkpoint_path, read_checkpoint
from engine.loops.skeleton import LoopResult
from engine.loops.world import PeerWorld, SyncWorld
from engine.protocols.base import Plugins, Runner
from engine.records.logs import (
    MISSING,
    RoundRows,
    RunLogger,
    RunRows,
    error_line,
    outcome_row,
    read_table,
)
from engine.records.progress import RoundProgress
from engine.resolve import build_task, config_yaml, controlled_uplink, digest, resolve
from policies.registry import chain_needs
from policies.streaming import Streaming
from scenarios.adversaries import Adversary, build_adversary
from scenarios.environments import EnvTask
from scenarios.models import ModelSpec
from scenarios.store import ClientStore
from scenarios.task import FederatedTask


@dataclass(frozen=True)
class RunResult:
    run_id: str
    log_dir: Path
    loop: LoopResult
    metric: str = "test accuracy"  # what loop.final_accuracy measures ("test return": RL)
    store: ClientStore | None = None  # the client data store it read (None: environments)

    @property
    def updates_per_s(self) -> float:
        return self.loop.client_updates / max(self.loop.wall_s, 1e-9)


def new_run_id(cfg: ExperimentConfig, now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}-{digest(cfg)[:8]}"


DEFAULT_OPTIONS = RuntimeOptions()


@dataclass(frozen=True)
class _Parts:
    """What one run is built from, before any pool exists."""

    mode: Runner  # the protocol's runner
    seeds: SeedTree
    adversary: Adversary | None
    task: FederatedTask
    world: SyncWorld | PeerWorld
    params: torch.Tensor
    spec: PoolSpec


def _validation(task: FederatedTask | EnvTask, plugins: Plugins) -> dict[str, Any]:
    """The validation scorer for a chain that scores models on held-out data (greedy_soup),
    as the runner's keyword; a split no stage reads, or a stage without one, is refused."""
    scorer = validation_scorer(task)
    reads = "validation" in chain_needs(plugins.aggregation)
    if scorer is not None and not reads:
        raise ConfigError("task.validation_fraction: holds out samples for a server stage "
                          "that scores models on them (greedy_soup), and this run's "
                          "aggregation has none; remove it")
    if reads and scorer is None:
        raise ConfigError("aggregation: the chain scores client models on the server's "
                          "held-out data (greedy_soup); set task.validation_fraction (e.g. "
                          "0.1) to hold out that share of the training samples")
    return {"validation": scorer} if reads else {}


def prepare(cfg: ExperimentConfig) -> _Parts:
    """Plugins, the protocol's runner, the world and the task: they fail on bad configs
    before Ray starts (sweeps prepare every run before the first one starts)."""
    seeds = SeedTree(cfg.seed)
    plugins = resolve(cfg)
    adversary = build_adversary(plugins.attack, cfg.attack.fraction, cfg.population.num_clients,
                                seeds.rng("byzantine"))
    task = build_task(cfg, plugins)
    validation = _validation(task, plugins)
    mode = plugins.protocol.build(cfg, plugins, task.model, seeds, **validation)
    if adversary is not None:
        task = adversary.poison(task)
    params = init_params(task.model.build, seeds.integer("init"))
    if not isinstance(task, EnvTask):  # an executor that cannot train the model says so now
        module = task.model.build()
        plugins.executor(module, ParamSpec.of(module))
    # A batch larger than the largest client is one full batch: cap it (for the whole
    # population, so padded shapes, and hence results, do not depend on the pool layout).
    batch = min(cfg.training.batch_size, int(task.client_sizes.max()))
    t = cfg.training
    hp = LocalSGD(t.local_epochs, batch, t.lr, t.momentum, t.prox_mu, t.max_local_steps,
                  t.min_local_steps, t.scaffold, t.sam_rho, frozen_features(cfg, task.model))
    world = mode.world(seeds, task, hp, params)
    spec = PoolSpec(task.model, hp, plugins.executor, cfg.seed, plugins.compressor,
                    cfg.training.compression.error_feedback, fisher=mode.fisher,
                    label_counts=mode.label_counts,
                    uplink=controlled_uplink(cfg, plugins.compressor),
                    streaming=None if t.streaming is None else Streaming(
                        **t.streaming.model_dump()))
    return _Parts(mode, seeds, adversary, task, world, params, spec)


def frozen_features(cfg: ExperimentConfig, model: ModelSpec) -> int:
    """How many leading coordinates of the flat model never train: with
    `training.freeze_features`, every parameter tensor but the last two (the output layer's
    weight and bias). Refused where there is nothing to freeze or no shared features."""
    if not cfg.training.freeze_features:
        return 0
    sizes = model.layer_sizes()
    why = ("the model has no feature layers (it is one linear layer)" if len(sizes) <= 2 else
           "a supermask model trains scores, not weights" if model.supermask is not None else
           "the peers start from independent models, so there are no shared features"
           if cfg.mode == "decentralized" and cfg.gossip.init == "independent" else None)
    if why:
        raise ConfigError(f"training.freeze_features: {why}; allowed with an MLP or CNN from "
                          "one shared initial model")
    return sum(sizes[:-2])


def run_experiment(cfg: ExperimentConfig, options: RuntimeOptions = DEFAULT_OPTIONS,
                   log_root: Path = Path("logs"), show_progress: bool = True,
                   run_id: str | None = None,
                   constants: dict[str, pa.Scalar] | None = None,
                   show_notes: bool = True, resume: bool = False) -> RunResult:
    """Run one experiment (federated or decentralized) and log it under log_root/<experiment>/.
    A sweep passes the run's stable id and its swept parameters (`constants`, extra columns of
    every table). Once its pools exist, however the run ends, its `outcomes` row says how.
    `show_notes`: print the protocol's notes (a reduction to another rule) on stderr first.
    The run checkpoints (engine/loops/keeper.py) every `options.checkpoint_every` rounds;
    `resume` continues run `run_id` from its checkpoint. A completed run's model is saved
    (`model_path`), and its checkpoint removed."""
    pin_torch_arithmetic()  # the driver's arithmetic is the same whatever the backend
    b = prepare(cfg)
    if show_notes:
        for note in b.mode.notes:  # once, before the run: a reduction to another rule
            print(f"note: {note}", file=sys.stderr, flush=True)
    started = datetime.now(UTC)
    run_id = run_id or new_run_id(cfg, started)
    log_dir = Path(log_root) / cfg.experiment
    checkpoint = checkpoint_path(log_dir, run_id)
    if resume and not checkpoint.is_file():
        raise ConfigError(f"run {run_id}: no checkpoint in {checkpoint.parent}")
    logger = RunLogger(log_dir, run_id, constants=constants)
    pools = b.mode.pools(b.task, b.spec, options, b.params, b.adversary, b.seeds)
    progress = RoundProgress(cfg.rounds, enabled=show_progress)
    status, error, clock = "failed", None, time.perf_counter()
    try:
        if not resume:  # a resumed run has its runs row already
            row = run_row(cfg, options, pools.num_pools, b.params.numel(), started,
                          getattr(b.task, "store", None))
            logger.append(b.mode.describe(row, b.world))
            logger.flush()
        evaluator = task_evaluator(b.task, cfg.seed)
        meta = {"config": cfg.to_dict(), "run_id": run_id, "digest": digest(cfg),
                "backend": options.backend, "pools": pools.num_pools,
                "constants": dict(constants or {})}
        keeper = Keeper(checkpoint, options.checkpoint_every, pools, logger, evaluator, meta,
                        resume, options.max_restarts)
        loop = b.mode.loop(pools, b.params, evaluator, logger, progress, b.seeds, b.adversary,
                           b.world, keeper)
        save_model(model_path(log_dir, run_id), b.task.model, loop.params)
        checkpoint.unlink(missing_ok=True)  # a completed run is not resumed: its model stays
        status = "completed"
    except KeyboardInterrupt as err:
        status = "interrupted"
        if checkpoint.is_file():  # the command that continues it, for run.py to print
            err.add_note(f"python run.py resume {log_dir} --run-id {run_id}")
        raise
    except Diverged as err:
        status, error = "diverged", error_line(err)
        raise
    except Exception as err:
        error = error_line(err)
        raise
    finally:
        progress.close()
        logger.append(outcome_row(status, error, logger.count(RoundRows),
                                  time.perf_counter() - clock))
        try:
            logger.flush()  # on a full disk, the outcome row where it still fits
        except OSError:
            if status == "completed":  # else the run's own error is already on its way
                raise
        finally:
            pools.close()
    return RunResult(run_id, log_dir, loop,
                     "test return" if isinstance(b.task, EnvTask) else "test accuracy",
                     getattr(b.task, "store", None))


def model_path(log_dir: Path, run_id: str) -> Path:
    return Path(log_dir) / "models" / f"run_id={run_id}" / "model.pt"


def save_model(path: Path, model: ModelSpec, params: torch.Tensor) -> None:
    """The final model, for `torch.load`: its flat parameter vector, and the same values as
    the `state_dict` of `model.build()` (an nn.Sequential), written atomically."""
    module = model.build()
    named = ParamSpec.of(module).unflatten(params.detach().float().clone())
    state = {**module.state_dict(), **named}
    buffer = io.BytesIO()
    torch.save({"params": params.detach().clone(), "state_dict": state}, buffer)
    write_atomic(path, buffer.getvalue())


def _versions() -> str:
    packages = ["torch", "ray", "numpy", "pyarrow", "pydantic"]
    return json.dumps({"python": platform.python_version(), "platform": sys.platform,
                       **{name: metadata.version(name) for name in packages}})


def run_row(cfg: ExperimentConfig, options: RuntimeOptions, num_pools: int | None,
            num_params: int | None, started: datetime,
            store: ClientStore | None = None) -> RunRows:
    """The runs-table row (pools and parameter count unknown, None, if the run failed before
    building them; no store for environments)."""
    built = MISSING if store is None or store.built_s is None else store.built_s
    return RunRows(
        experiment=[cfg.experiment], config_yaml=[config_yaml(cfg)], config_digest=[digest(cfg)],
        seed=[cfg.seed], mode=[cfg.mode], backend=[options.backend],
        executor=[cfg.training.executor], num_pools=np.array([num_pools], dtype=object),
        num_clients=[cfg.population.num_clients], rounds_planned=[cfg.rounds],
        num_params=np.array([num_params], dtype=object),
        started_at=np.array([started.replace(tzinfo=None)], dtype="datetime64[ms]"),
        versions=[_versions()],
        data_store=np.array([MISSING if store is None else str(store.path)], dtype=object),
        data_build_s=np.array([built], dtype=object),
    )


def resumable(log_dir: Path, run_id: str | None = None) -> tuple[str, dict]:
    """The run to resume under log_dir (an experiment's folder): `run_id`, or the one whose
    checkpoint was written last; its checkpoint's meta. One ConfigError line if there is
    none, or the run has ended."""
    log_dir = Path(log_dir)
    found = sorted(log_dir.glob("checkpoints/run_id=*/checkpoint.pkl"),
                   key=lambda p: p.stat().st_mtime)
    if run_id is not None:
        found = [p for p in found if p.parent.name == f"run_id={run_id}"]
    if not found:
        ended = _ended(log_dir).get(run_id) if run_id else None
        raise ConfigError(f"{log_dir}: " + (f"run {run_id} ended {ended}; nothing to resume"
                                            if ended else "no checkpoint to resume"
                                            + (f" for run {run_id}" if run_id else "")))
    path = found[-1]
    run_id = path.parent.name.removeprefix("run_id=")
    ended = _ended(log_dir).get(run_id)
    if ended in ("completed", "diverged"):
        raise ConfigError(f"{log_dir}: run {run_id} ended {ended}; nothing to resume")
    return run_id, read_checkpoint(path)["meta"]


def checkpoint_meta(log_dir: Path, run_id: str) -> dict | None:
    """The meta of run `run_id`'s checkpoint under log_dir (an experiment's folder); None if
    it has none, or one that cannot be read (of another version, or cut short)."""
    path = checkpoint_path(log_dir, run_id)
    if not path.is_file():
        return None
    try:
        return read_checkpoint(path)["meta"]
    except Exception:
        return None


def _ended(log_dir: Path) -> dict[str, str]:
    outcomes = read_table(log_dir, "outcomes").sort_by("finished_at")
    return dict(zip(outcomes["run_id"].to_pylist(), outcomes["status"].to_pylist(),
                    strict=True))
