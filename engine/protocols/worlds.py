"""The worlds of runs, from a config and its resolved plugins: the peers' network, a
federated run's world (availability, selection, devices, liveness) and a peer run's (the same
world models, and MoDeST's sampled rounds over them)."""

from __future__ import annotations

import numpy as np

from engine.core.config import ExperimentConfig
from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from engine.loops.sampling import SampledWorld
from engine.loops.world import PeerWorld, SyncWorld, upload_bytes
from engine.protocols.base import Plugins
from policies.schedules import gossip_schedule
from scenarios.devices import build_devices
from scenarios.failures import Liveness, peer_faults_configured
from scenarios.network import Network
from scenarios.population import clients_per_round


def build_network(cfg: ExperimentConfig, plugins: Plugins) -> Network:
    """The peers' network over rounds (topology, mixing, redraws, outages)."""
    t = cfg.topology
    return Network(plugins.topology, plugins.mixing, cfg.population.num_clients,
                   SeedTree(cfg.seed), label=t.kind, redraw=t.dynamic == "redraw",
                   allow_disconnected=t.allow_disconnected, outages=t.outages)


def build_world(cfg: ExperimentConfig, client_sizes, hp, model_bytes: int,
                plugins: Plugins) -> SyncWorld:
    """The world of a federated run: availability, selection, devices, liveness."""
    n, seeds = cfg.population.num_clients, SeedTree(cfg.seed)
    return SyncWorld(cfg, client_sizes, hp, model_bytes, seeds, plugins.availability,
                     plugins.selection, build_devices(plugins.devices, cfg.devices.path, n, seeds),
                     Liveness(cfg.failures, n, seeds, plugins.downtime), plugins.compressor,
                     plugins.platform)


def peer_schedule(cfg: ExperimentConfig) -> np.ndarray:
    """int64 [rounds]: the gossip steps of each synchronous round (policies/schedules.py)."""
    s = cfg.gossip.schedule
    if s.kind != "constant" and cfg.gossip.steps != 1:
        raise ConfigError(f"gossip.steps: with gossip.schedule.kind={s.kind} the budget sets "
                          "the steps of each round; leave gossip.steps out")
    return gossip_schedule(s.kind, cfg.rounds, cfg.gossip.steps, s.budget, s.late_fraction)


def build_peer_world(cfg: ExperimentConfig, sizes, hp, model_bytes: int,
                     plugins: Plugins) -> PeerWorld | SampledWorld:
    """The world of a decentralized run: the network, liveness, availability, selection of
    the peers that train, devices, a deadline (the same world models as a federated run);
    with a sampling protocol (MoDeST), its rounds planned over that world. A gossip message
    is the compressor's size of the model (CHOCO sends compressed differences)."""
    n, seeds = cfg.population.num_clients, SeedTree(cfg.seed)
    world = PeerWorld(build_network(cfg, plugins), cfg.failures,
                      Liveness(cfg.failures, n, seeds, plugins.downtime), plugins.availability,
                      plugins.selection, clients_per_round(cfg.population),
                      build_devices(plugins.devices, cfg.devices.path, n, seeds), hp, sizes,
                      seeds, upload_bytes(plugins.compressor, model_bytes), peer_schedule(cfg),
                      cfg.selection.deadline_s,
                      peer_faults_configured(cfg.failures))
    sampling = plugins.consensus.sampling
    return world if sampling is None else SampledWorld(world, sampling, cfg.failures)
