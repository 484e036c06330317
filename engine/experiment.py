"""Wire one experiment: config -> task + world -> pools -> round loop -> Arrow logs."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from engine.backends.runtime import Pools, RuntimeOptions, make_pools
from engine.compute.evaluation import Evaluator
from engine.compute.peers import PeerPool, PeerSpec
from engine.compute.pool import PoolSpec
from engine.compute.training import LocalSGD, pin_torch_arithmetic
from engine.core.config import ExperimentConfig
from engine.core.errors import ConfigError, Diverged
from engine.core.params import init_params
from engine.core.seeds import SeedTree
from engine.loops.async_fl import AsyncSetup, async_rounds, check_assigned_steps
from engine.loops.async_gossip import Rates, async_gossip_units
from engine.loops.decentralized import GossipSetup, decentralized_rounds
from engine.loops.federated import Accountant, FederatedSetup, federated_rounds
from engine.loops.sampling import SampledWorld
from engine.loops.skeleton import LoopResult
from engine.loops.world import PeerWorld, SyncWorld, upload_bytes
from engine.records.logs import RoundRows, RunLogger, RunRows, error_line, outcome_row
from engine.records.progress import RoundProgress
from engine.resolve import (
    Plugins,
    build_peer_world,
    build_task,
    build_world,
    config_yaml,
    digest,
    resolve,
)
from policies.registry import (
    build_aggregator,
    noise_multipliers,
    pools_compute_fisher,
    pools_may_reduce,
    synchronous_only,
)
from scenarios.adversaries import Adversary, build_adversary
from scenarios.mixing import column_stochastic
from scenarios.models import ModelSpec
from scenarios.population import FEDERATED_FRACTION, clients_per_round
from scenarios.task import FederatedTask


@dataclass(frozen=True)
class RunResult:
    run_id: str
    log_dir: Path
    loop: LoopResult

    @property
    def updates_per_s(self) -> float:
        return self.loop.client_updates / max(self.loop.wall_s, 1e-9)


def new_run_id(cfg: ExperimentConfig, now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}-{digest(cfg)[:8]}"


DEFAULT_OPTIONS = RuntimeOptions()


@dataclass(frozen=True)
class _Parts:
    """What one run is built from, before any pool exists."""

    mode: FederatedMode | DecentralizedMode
    seeds: SeedTree
    adversary: Adversary | None
    task: FederatedTask
    world: SyncWorld | PeerWorld
    params: torch.Tensor
    spec: PoolSpec


def prepare(cfg: ExperimentConfig) -> _Parts:
    """Plugins, the world and the task: they fail on bad configs before Ray starts."""
    seeds = SeedTree(cfg.seed)
    plugins = resolve(cfg)
    adversary = build_adversary(plugins.attack, cfg.attack.fraction, cfg.population.num_clients,
                                seeds.rng("byzantine"))
    task = build_task(cfg, plugins)
    mode = PROTOCOLS[cfg.mode](cfg, plugins, task.model, seeds)
    if adversary is not None:
        task = adversary.poison(task)
    params = init_params(task.model.build, seeds.integer("init"))
    # A batch larger than the largest client is one full batch: cap it (for the whole
    # population, so padded shapes, and hence results, do not depend on the pool layout).
    batch = min(cfg.training.batch_size, int(task.client_sizes.max()))
    t = cfg.training
    hp = LocalSGD(t.local_epochs, batch, t.lr, t.momentum, t.prox_mu, t.max_local_steps,
                  t.min_local_steps, t.scaffold)
    world = mode.world(seeds, task, hp, params)
    spec = PoolSpec(task.model, hp, plugins.executor, cfg.seed, plugins.compressor,
                    cfg.training.compression.error_feedback, fisher=mode.fisher)
    return _Parts(mode, seeds, adversary, task, world, params, spec)


def run_experiment(cfg: ExperimentConfig, options: RuntimeOptions = DEFAULT_OPTIONS,
                   log_root: Path = Path("logs"), show_progress: bool = True,
                   run_id: str | None = None,
                   constants: dict[str, pa.Scalar] | None = None) -> RunResult:
    """Run one experiment (federated or decentralized) and log it under log_root/<experiment>/.
    A sweep passes the run's stable id and its swept parameters (`constants`, extra columns of
    every table). Once its pools exist, however the run ends, its `outcomes` row says how."""
    pin_torch_arithmetic()  # the driver's arithmetic is the same whatever the backend
    b = prepare(cfg)
    started = datetime.now(UTC)
    run_id = run_id or new_run_id(cfg, started)
    log_dir = Path(log_root) / cfg.experiment
    logger = RunLogger(log_dir, run_id, constants=constants)
    pools = b.mode.pools(b.task, b.spec, options, b.params, b.adversary, b.seeds)
    progress = RoundProgress(cfg.rounds, enabled=show_progress)
    status, error, clock = "failed", None, time.perf_counter()
    try:
        row = run_row(cfg, options, pools.num_pools, b.params.numel(), started)
        logger.append(b.mode.describe(row, b.world))
        logger.flush()
        evaluator = Evaluator(b.task.model, b.task.data.x_test, b.task.data.y_test)
        loop = b.mode.loop(pools, b.params, evaluator, logger, progress, b.seeds, b.adversary,
                           b.world)
        status = "completed"
    except KeyboardInterrupt:
        status = "interrupted"
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
        logger.flush()
        pools.close()
    return RunResult(run_id, log_dir, loop)


class FederatedMode:
    """Server-based: a server rule (synchronous rounds, or an asynchronous rule in virtual
    time) and an aggregation chain over the clients' updates."""

    def __init__(self, cfg: ExperimentConfig, plugins: Plugins, model: ModelSpec,
                 seeds: SeedTree) -> None:
        self.cfg, self.plugins = cfg, plugins
        self.aggregator = build_aggregator(plugins.aggregation, cfg.population.num_clients,
                                           model.supermask_layers(), seeds)
        self.fisher = pools_compute_fisher(plugins.aggregation)
        rule = plugins.server
        batch = rule.batch if rule.asynchronous else clients_per_round(cfg.population,
                                                                       FEDERATED_FRACTION)
        if batch is not None and batch < self.aggregator.min_updates:
            raise ConfigError(
                f"aggregation with server.mode={cfg.server.mode}: the chain is defined on at "
                f"least {self.aggregator.min_updates} updates (Krum: K > 2f + 2, Bulyan: "
                f"K >= 4f + 3, NNM: K > 2f), and each server step has at most {batch}")
        if rule.asynchronous:
            reason = synchronous_only(plugins.aggregation)
            if reason:
                raise ConfigError(f"aggregation with server.mode={cfg.server.mode}: {reason}")
            if plugins.selection.closes_at_k:
                raise ConfigError(f"selection.kind={cfg.selection.kind} with server.mode="
                                  f"{cfg.server.mode}: over-selection keeps the first K reports "
                                  "of a round, and an asynchronous server has no round to close")

    def world(self, seeds: SeedTree, task: FederatedTask, hp: LocalSGD,
              params: torch.Tensor) -> SyncWorld:
        world = build_world(self.cfg, task.client_sizes, hp,
                            params.numel() * params.element_size(), self.plugins)
        check_assigned_steps(self.plugins.server, world)
        return world

    def pools(self, task, spec, options, params, adversary, seeds) -> Pools:
        return make_pools(task, spec, options)

    def describe(self, row: RunRows, world: SyncWorld) -> RunRows:
        return row

    def loop(self, pools, params, evaluator, logger, progress, seeds, adversary, world):
        cfg = self.cfg
        if self.plugins.server.asynchronous:
            setup = AsyncSetup(cfg.rounds, cfg.eval_every, seeds, self.plugins.server,
                               self.aggregator, cfg.server.concurrency, world,
                               cfg.population.availability.slot_s, adversary,
                               cfg.training.scaffold, _accountant(cfg, self.plugins))
            return async_rounds(setup, pools, params, evaluator, logger, progress)
        # attackers replace updates after training: pools must then ship every delta
        pre_reduce = pools_may_reduce(self.plugins.aggregation) and (
            adversary is None or adversary.attack.corrupt is None)
        setup = FederatedSetup(cfg.rounds, cfg.eval_every, seeds, pre_reduce, world, adversary,
                               cfg.training.scaffold, _accountant(cfg, self.plugins))
        return federated_rounds(setup, pools, self.aggregator, params, evaluator, logger,
                                progress)


class DecentralizedMode:
    """Peers on a graph: local training, then gossip steps with a consensus policy."""

    def __init__(self, cfg: ExperimentConfig, plugins: Plugins, model: ModelSpec,
                 seeds: SeedTree) -> None:
        self.cfg, self.plugins, self.consensus = cfg, plugins, plugins.consensus
        self.fisher = False
        if cfg.training.scaffold:
            raise ConfigError("training.scaffold: SCAFFOLD needs a server; it applies to "
                              "federated runs only")
        if not plugins.compressor.lossless and column_stochastic(plugins.mixing):
            raise ConfigError("training.compression with consensus=push_sum: CHOCO-SGD's public "
                              "copies average under doubly stochastic weights; push-sum's masses "
                              "are not compressed copies")
        if self.consensus.sampling is not None:
            _check_sampling(cfg, plugins)

    def world(self, seeds: SeedTree, task: FederatedTask, hp: LocalSGD,
              params: torch.Tensor) -> PeerWorld | SampledWorld:
        return build_peer_world(self.cfg, task.client_sizes, hp,
                                params.numel() * params.element_size(), self.plugins)

    def pools(self, task, spec, options, params, adversary, seeds) -> Pools:
        g = self.cfg.gossip
        rng = seeds.rng("peer_test_sample")
        n_test = min(g.peer_test_samples, task.data.y_test.size)
        rows = np.sort(rng.choice(task.data.y_test.size, n_test, replace=False))
        peers = PeerSpec(self.consensus, g.init, _byzantine_ids(adversary),
                         None if adversary is None else adversary.attack.forge,
                         task.data.x_test[rows], task.data.y_test[rows], g.consensus_step)
        return make_pools(task, spec, options, PeerPool, (peers, params.numpy()))

    def describe(self, row: RunRows, world: PeerWorld) -> RunRows:
        s = world.network.summary()
        return row._replace(
            topology=[s.kind], num_edges=[s.num_edges],
            degree_min=[s.degree_min], degree_mean=[s.degree_mean], degree_max=[s.degree_max],
            spectral_gap=[s.spectral_gap])

    def loop(self, pools, params, evaluator, logger, progress, seeds, adversary, world):
        g = self.cfg.gossip
        model_bytes = params.numel() * params.element_size()
        setup = GossipSetup(self.cfg.rounds, g.steps, self.cfg.eval_every, g.eval_peers,
                            g.final_merge, seeds, _byzantine_ids(adversary), world,
                            upload_bytes(self.plugins.compressor, model_bytes))
        network = world.network
        if g.mode == "async":
            a = g.asynchronous
            compressed = not self.plugins.compressor.lossless
            pairwise = self.consensus.pairwise and not compressed and (
                adversary is None or adversary.attack.forge is None)
            return async_gossip_units(setup, Rates(a.edge_rate, a.step_rate, a.wake_rate),
                                      pools, world, evaluator, logger, progress, pairwise,
                                      compressed)
        return decentralized_rounds(setup, pools, network, evaluator, logger, progress)


def _check_sampling(cfg: ExperimentConfig, plugins: Plugins) -> None:
    """What MoDeST (consensus=modest) cannot take, and why."""
    if cfg.gossip.mode == "async":
        raise ConfigError("gossip.mode=async with consensus=modest: MoDeST's rounds are its "
                          "protocol (a sample trains, aggregators wait for a share of it); it "
                          "has no Poisson-clock form")
    if cfg.gossip.steps != 1:
        raise ConfigError("gossip.steps: consensus=modest hands each round's aggregate on "
                          "once; steps must be 1")
    if not plugins.compressor.lossless:
        raise ConfigError("training.compression with consensus=modest: a compressed "
                          "message is a difference to a model both ends hold, and MoDeST's "
                          "aggregators change every round and need not hold the model the "
                          "trainers started from")
    if cfg.population.participation is not None:
        raise ConfigError("population.participation with consensus=modest: MoDeST's "
                          "sample_size is its participation")
    if cfg.selection.kind != "uniform":
        raise ConfigError(f"selection.kind={cfg.selection.kind} with consensus=modest: every "
                          "peer computes MoDeST's sample from a shared seeded order, with no "
                          "coordinator to rank peers or close a round at K reports (its "
                          "success_fraction does that)")


PROTOCOLS = {"federated": FederatedMode, "decentralized": DecentralizedMode}


def _accountant(cfg: ExperimentConfig, plugins: Plugins) -> Accountant | None:
    """The privacy accountant when the chain adds a Gaussian mechanism's noise: sampled
    (q = K / N) in synchronous rounds; per client contribution under an asynchronous server."""
    noise = noise_multipliers(plugins.aggregation)
    if not noise:
        return None
    if plugins.server.asynchronous:  # no sampling: the Gaussian mechanism per contribution
        return Accountant(noise[0], 1.0, cfg.server.dp_delta)
    q = clients_per_round(cfg.population, FEDERATED_FRACTION) / cfg.population.num_clients
    return Accountant(noise[0], q, cfg.server.dp_delta)


def _byzantine_ids(adversary: Adversary | None) -> np.ndarray:
    if adversary is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(adversary.byzantine).astype(np.int64)


def _versions() -> str:
    packages = ["torch", "ray", "numpy", "pyarrow", "pydantic"]
    return json.dumps({"python": platform.python_version(), "platform": sys.platform,
                       **{name: metadata.version(name) for name in packages}})


def run_row(cfg: ExperimentConfig, options: RuntimeOptions, num_pools: int | None,
            num_params: int | None, started: datetime) -> RunRows:
    """The runs-table row (pools and parameter count unknown, None, if the run failed before
    building them)."""
    return RunRows(
        experiment=[cfg.experiment], config_yaml=[config_yaml(cfg)], config_digest=[digest(cfg)],
        seed=[cfg.seed], mode=[cfg.mode], backend=[options.backend],
        executor=[cfg.training.executor], num_pools=np.array([num_pools], dtype=object),
        num_clients=[cfg.population.num_clients], rounds_planned=[cfg.rounds],
        num_params=np.array([num_params], dtype=object),
        started_at=np.array([started.replace(tzinfo=None)], dtype="datetime64[ms]"),
        versions=[_versions()],
    )
