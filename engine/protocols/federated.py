"""Server-based protocols: synchronous FL rounds, and the asynchronous server rules (FedAsync,
FedBuff, FedFix, FedCompass) in virtual time. Each is a declaration (what it consumes) over
one runner, `Federated`, which wires a server rule and an aggregation chain over the clients'
updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.backends.runtime import Pools, make_pools
from engine.compute.training import LocalSGD
from engine.core.config import ExperimentConfig
from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from engine.loops.async_fl import AsyncSetup, async_rounds, check_assigned_steps
from engine.loops.federated import Accountant, FederatedSetup, federated_rounds
from engine.loops.world import SyncWorld
from engine.protocols.base import Plugins, ProtocolSpec
from engine.protocols.worlds import build_world
from engine.records.logs import RunRows
from policies.asynchronous import ServerRule
from policies.consensus import Consensus
from policies.registry import (
    build_aggregator,
    chain_needs,
    noise_multipliers,
    on_one_update,
    pools_compute_fisher,
    pools_may_reduce,
    synchronous_only,
)
from scenarios.models import ModelSpec
from scenarios.population import FEDERATED_FRACTION, clients_per_round
from scenarios.task import FederatedTask

# what every server-based protocol consumes beyond the parts common to all
SERVER_PARTS = frozenset({"server", "aggregation", "selection", "scaffold", "compression",
                          "error_feedback", "local_steps", "dropouts"})


class Federated:
    """A server rule (synchronous rounds, or an asynchronous rule in virtual time) and an
    aggregation chain over the clients' updates."""

    def __init__(self, cfg: ExperimentConfig, plugins: Plugins, model: ModelSpec,
                 seeds: SeedTree, validation: Callable[[torch.Tensor], float] | None = None
                 ) -> None:
        self.cfg, self.plugins = cfg, plugins
        protocol, rule = plugins.protocol, plugins.server
        streaming = cfg.training.streaming
        self.aggregator = build_aggregator(plugins.aggregation, cfg.population.num_clients,
                                           model.supermask_layers(), seeds,
                                           fragments=None if streaming is None else
                                           streaming.fragments,
                                           layer_sizes=model.layer_sizes(),
                                           validation=validation)
        if streaming is not None:
            _check_streaming(cfg, plugins)
        self.fisher = pools_compute_fisher(plugins.aggregation)
        self.label_counts = "label_counts" in chain_needs(plugins.aggregation)
        # the validation scorer is the task's (engine/experiment.py), not an update column
        missing = chain_needs(plugins.aggregation) - protocol.provides - {"validation"}
        if missing:
            raise ConfigError(f"aggregation with {protocol.label}: the chain reads "
                              f"{', '.join(sorted(missing))} from the updates, which "
                              f"{protocol.label}'s updates do not carry")
        batch = rule.batch if rule.asynchronous else clients_per_round(cfg.population,
                                                                       FEDERATED_FRACTION)
        if batch is not None and batch < self.aggregator.min_updates:
            raise ConfigError(
                f"aggregation with {protocol.label}: the chain is defined on at least "
                f"{self.aggregator.min_updates} updates (Krum: K > 2f + 2, Bulyan: "
                f"K >= 4f + 3, NNM: K > 2f), and each server step has at most {batch}")
        same = on_one_update(plugins.aggregation) if batch == 1 else None
        self.notes = () if same is None else (
            f"aggregation with {protocol.label}: every server step aggregates 1 update, on "
            f"which this chain computes what {same} does: the run gives aggregation={same}'s "
            "results (up to float rounding)",)
        if rule.asynchronous:
            reason = synchronous_only(plugins.aggregation)
            if reason:
                raise ConfigError(f"aggregation with {protocol.label}: {reason}")
            if plugins.selection.closes_at_k:
                raise ConfigError(f"selection.kind={cfg.selection.kind} with {protocol.label}: "
                                  "over-selection keeps the first K reports of a round, and "
                                  "an asynchronous server has no round to close")

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

    def loop(self, pools, params, evaluator, logger, progress, seeds, adversary, world,
             keeper=None):
        cfg = self.cfg
        if self.plugins.server.asynchronous:
            setup = AsyncSetup(cfg.rounds, cfg.eval_every, seeds, self.plugins.server,
                               self.aggregator, cfg.server.concurrency, world,
                               cfg.population.availability.slot_s, adversary,
                               cfg.training.scaffold, _accountant(cfg, self.plugins),
                               cfg.diverge_after)
            return async_rounds(setup, pools, params, evaluator, logger, progress, keeper)
        # attackers replace updates after training: pools must then ship every delta
        pre_reduce = pools_may_reduce(self.plugins.aggregation) and (
            adversary is None or adversary.attack.corrupt is None)
        setup = FederatedSetup(cfg.rounds, cfg.eval_every, seeds, pre_reduce, world, adversary,
                               cfg.training.scaffold, _accountant(cfg, self.plugins),
                               cfg.diverge_after)
        return federated_rounds(setup, pools, self.aggregator, params, evaluator, logger,
                                progress, keeper)


def _check_streaming(cfg: ExperimentConfig, plugins: Plugins) -> None:
    """Streaming DiLoCo's workers send their own quantised fragment: one ConfigError line for
    what they would not use."""
    s = cfg.training.streaming
    if s.tau >= s.fragments:
        raise ConfigError(f"training.streaming.tau={s.tau}: the overlap must be shorter than "
                          f"the {s.fragments} rounds between two synchronisations of a fragment")
    if not plugins.compressor.lossless:
        raise ConfigError("training.compression: Streaming DiLoCo's workers quantise their "
                          "fragment themselves (training.streaming.bits); remove it")
    if cfg.training.scaffold:
        raise ConfigError("training.scaffold: Streaming DiLoCo's workers keep their own "
                          "parameters, which SCAFFOLD's controls do not model; remove it")


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


def _federated(cfg: ExperimentConfig) -> bool:
    return cfg.mode == "federated"


def sync_fl() -> ProtocolSpec:
    """Synchronous FL (`server.mode: sync`): rounds of K selected clients (McMahan et al.,
    2017), closed by the last report, the K-th with over-selection, or a deadline."""
    return ProtocolSpec(
        "sync", "sync FL", "federated",
        selects=lambda cfg, rule, consensus: _federated(cfg) and not rule.asynchronous,
        consumes=SERVER_PARTS | {"participation", "deadline", "platform", "streaming",
                                 "controlled_compression"},
        build=Federated, example={"population": {"participation": {"clients_per_round": 6}},
                                  "server": {"mode": "sync"}},
        provides=frozenset({"losses", "steps", "label_counts", "fisher"}))


ASYNC_WHY = {
    "participation": "server.concurrency sets how many clients train at once",
    "deadline": "an asynchronous server has no round to close",
    "platform": "the aggregators are timed over a synchronous round's arrivals",
    "streaming": "Streaming DiLoCo synchronises one fragment per synchronous round",
    "controlled_compression": "SCALLION and SCAFCOM's server steps c with the round's "
                              "messages (c += (alpha / N) sum_i d_i), a synchronous round",
}


def asynchronous(mode: str | None, label: str, server: dict[str, Any] | None,
                 **example: Any) -> ProtocolSpec:
    """An asynchronous server rule (policies/asynchronous.py) in virtual time: `mode` names
    its rule (None: any asynchronous rule, e.g. an out-of-tree one); `server` (the rule's
    parameters) and `example` (other sections) make the matrix's example config."""

    def selects(cfg: ExperimentConfig, rule: ServerRule, consensus: Consensus) -> bool:
        return _federated(cfg) and rule.asynchronous and mode in (None, cfg.server.mode)

    return ProtocolSpec(mode or "async", label, "federated", selects=selects,
                        consumes=SERVER_PARTS, build=Federated,
                        example=None if server is None else {
                            "server": {"mode": mode, **server}, **example},
                        why_not=ASYNC_WHY)


def fedasync() -> ProtocolSpec:
    """FedAsync (Xie, Koyejo & Gupta, 2019): the server steps on every arrival."""
    return asynchronous("fedasync", "FedAsync", {"concurrency": 4})


def fedbuff() -> ProtocolSpec:
    """FedBuff (Nguyen et al., 2022): the server steps every `buffer` arrivals."""
    return asynchronous("fedbuff", "FedBuff", {"buffer": 6, "concurrency": 8})


def fedfix() -> ProtocolSpec:
    """FedFix (Fraboni et al., 2023): the server steps every `interval_s` of virtual time."""
    return asynchronous("fedfix", "FedFix", {"interval_s": 0.05, "concurrency": 6})


def fedcompass() -> ProtocolSpec:
    """FedCompass (Li et al., ICLR 2024): semi-asynchronous arrival groups, the server
    assigning each dispatch's local steps."""
    return asynchronous("fedcompass", "FedCompass", {"max_local_steps": 2, "concurrency": 6},
                        training={"local_epochs": 2})


def async_fl() -> ProtocolSpec:
    """Any other asynchronous server rule (an out-of-tree `server.mode: package.module:rule`);
    not a column of the compatibility matrix."""
    return asynchronous(None, "asynchronous FL", None)
