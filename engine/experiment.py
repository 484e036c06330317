"""Wire one experiment: config -> task + world -> pools -> round loop -> Arrow logs."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from engine.config import ExperimentConfig
from engine.evaluation import Evaluator
from engine.federated import FederatedSetup, LoopResult, federated_rounds
from engine.logs import RunLogger, RunRows
from engine.params import init_params
from engine.pool import PoolSpec
from engine.progress import RoundProgress
from engine.runtime import RuntimeOptions, make_pools
from engine.seeds import SeedTree
from engine.training import LocalSGD, pin_torch_arithmetic
from policies.registry import build_aggregator, pools_may_reduce
from scenarios.adversaries import build_adversary
from scenarios.population import clients_per_round
from scenarios.task import FederatedTask, build_task


@dataclass(frozen=True)
class RunResult:
    run_id: str
    log_dir: Path
    loop: LoopResult

    @property
    def updates_per_s(self) -> float:
        return self.loop.client_updates / max(self.loop.wall_s, 1e-9)


def new_run_id(cfg: ExperimentConfig, now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}-{cfg.digest()[:8]}"


DEFAULT_OPTIONS = RuntimeOptions()


def run_experiment(cfg: ExperimentConfig, options: RuntimeOptions = DEFAULT_OPTIONS,
                   log_root: Path = Path("logs"), show_progress: bool = True) -> RunResult:
    """Run one federated experiment and log it under log_root/<experiment>/."""
    pin_torch_arithmetic()  # the driver's arithmetic is the same whatever the backend
    aggregator = build_aggregator(cfg.aggregation)  # config errors surface before Ray starts
    seeds = SeedTree(cfg.seed)
    adversary = build_adversary(cfg.attack, cfg.population.num_clients, seeds.rng("byzantine"))
    task = build_task(cfg, seeds)
    if adversary is not None:
        task = adversary.poison(task)
    params = init_params(task.model.build, seeds.integer("init"))
    # A batch larger than the largest client is one full batch: cap it (for the whole
    # population, so padded shapes, and hence results, do not depend on the pool layout).
    batch = min(cfg.training.batch_size, int(task.client_sizes.max()))
    hp = LocalSGD(cfg.training.local_epochs, batch, cfg.training.lr)
    spec = PoolSpec(task.model, hp, cfg.training.executor, cfg.seed)
    started = datetime.now(UTC)
    run_id = new_run_id(cfg, started)
    log_dir = Path(log_root) / cfg.experiment
    logger = RunLogger(log_dir, run_id)
    pools = make_pools(task, spec, options)
    progress = RoundProgress(cfg.rounds, enabled=show_progress)
    try:
        logger.append(_run_row(cfg, options, task, pools.num_pools, params.numel(), started))
        logger.flush()
        # attackers replace updates after training: pools must then ship every delta
        pre_reduce = pools_may_reduce(cfg.aggregation) and (
            adversary is None or adversary.attack.corrupt is None)
        setup = FederatedSetup(cfg.rounds, clients_per_round(cfg.population), cfg.eval_every,
                               seeds, pre_reduce, adversary)
        evaluator = Evaluator(task.model, task.data.x_test, task.data.y_test)
        loop = federated_rounds(setup, pools, aggregator, params, evaluator, logger, progress,
                                task.num_clients)
    finally:
        progress.close()
        logger.flush()
        pools.close()
    return RunResult(run_id, log_dir, loop)


def _versions() -> str:
    packages = ["torch", "ray", "numpy", "pyarrow", "pydantic"]
    return json.dumps({"python": platform.python_version(), "platform": sys.platform,
                       **{name: metadata.version(name) for name in packages}})


def _run_row(cfg: ExperimentConfig, options: RuntimeOptions, task: FederatedTask,
             num_pools: int, num_params: int, started: datetime) -> RunRows:
    return RunRows(
        experiment=[cfg.experiment], config_yaml=[cfg.to_yaml()], config_digest=[cfg.digest()],
        seed=[cfg.seed], mode=["federated"], backend=[options.backend],
        executor=[cfg.training.executor], num_pools=[num_pools],
        num_clients=[task.num_clients], rounds_planned=[cfg.rounds], num_params=[num_params],
        started_at=np.array([started.replace(tzinfo=None)], dtype="datetime64[ms]"),
        versions=[_versions()],
    )
