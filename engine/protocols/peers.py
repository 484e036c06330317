"""Peer protocols: synchronous gossip rounds (D-SGD with any consensus policy), asynchronous
Poisson-clock gossip in virtual time, and MoDeST's sampled rounds. Each is a declaration over
one runner, `Peers`: peers train locally and mix with a consensus policy."""

from __future__ import annotations

import numpy as np
import torch

from engine.backends.runtime import Pools, make_pools
from engine.compute.evaluation import task_evaluator
from engine.compute.peers import PeerPool, PeerSpec
from engine.compute.training import LocalSGD
from engine.core.config import ExperimentConfig
from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from engine.loops.async_gossip import Rates, async_gossip_units
from engine.loops.decentralized import GossipSetup, decentralized_rounds
from engine.loops.sampling import SampledWorld
from engine.loops.world import PeerWorld, upload_bytes
from engine.protocols.base import Plugins, ProtocolSpec
from engine.protocols.worlds import build_peer_world, peer_schedule
from engine.records.logs import RunRows
from scenarios.adversaries import Adversary
from scenarios.mixing import column_stochastic
from scenarios.models import ModelSpec
from scenarios.task import FederatedTask

# what every peer protocol consumes beyond the parts common to all
PEER_PARTS = frozenset({"gossip", "consensus"})
PEER_EXAMPLE = {"mode": "decentralized", "topology": {"kind": "ring"},
                "gossip": {"eval_peers": 2}}


class Peers:
    """Peers train locally, then mix with a consensus policy: in rounds of gossip steps over
    the graph, on Poisson clocks, or as MoDeST's sampled rounds (the world decides W)."""

    def __init__(self, cfg: ExperimentConfig, plugins: Plugins, model: ModelSpec,
                 seeds: SeedTree) -> None:
        self.cfg, self.plugins, self.consensus = cfg, plugins, plugins.consensus
        self.fisher, self.label_counts, self.notes = False, False, ()
        if not plugins.compressor.lossless and column_stochastic(plugins.mixing):
            raise ConfigError("training.compression with consensus=push_sum: CHOCO-SGD's public "
                              "copies average under doubly stochastic weights; push-sum's masses "
                              "are not compressed copies")
        if (self.consensus.output_layer and len(model.layer_sizes()) > 2
                and not cfg.training.freeze_features):
            raise ConfigError("consensus: this policy mixes only the output layer (Bristle), so "
                              "the feature layers must stay shared: set "
                              "training.freeze_features=true (or task.model.kind=logistic)")
        if self.consensus.accelerated is not None:
            _dadao_settings(cfg)
            if not plugins.compressor.lossless:
                raise ConfigError("training.compression with consensus=dadao: DADAO's pairwise "
                                  "messages (y + z) have no compressed form; allowed: none")

    def world(self, seeds: SeedTree, task: FederatedTask, hp: LocalSGD,
              params: torch.Tensor) -> PeerWorld | SampledWorld:
        return build_peer_world(self.cfg, task.client_sizes, hp,
                                params.numel() * params.element_size(), self.plugins)

    def pools(self, task, spec, options, params, adversary, seeds) -> Pools:
        g = self.cfg.gossip
        if self.consensus.evidence and not isinstance(task, FederatedTask):
            raise ConfigError("consensus: this policy judges models on the peers' labelled "
                              "data; a task learnt by acting has none")
        if self.consensus.accelerated is not None and not isinstance(task, FederatedTask):
            raise ConfigError("consensus=dadao: DADAO takes gradients of a loss on labelled "
                              "data; a task learnt by acting has none")
        rows = None
        if isinstance(task, FederatedTask):  # each peer is scored on a sample of the test set
            rng, size = seeds.rng("peer_test_sample"), task.data.y_test.size
            rows = np.sort(rng.choice(size, min(g.peer_test_samples, size), replace=False))
        peers = PeerSpec(self.consensus, g.init, byzantine_ids(adversary),
                         None if adversary is None else adversary.attack.forge,
                         task_evaluator(task, self.cfg.seed, rows), g.consensus_step,
                         self.cfg.population.num_clients)
        return make_pools(task, spec, options, PeerPool, (peers, params.numpy()))

    def describe(self, row: RunRows, world: PeerWorld) -> RunRows:
        s = world.network.summary()
        return row._replace(
            topology=[s.kind], num_edges=[s.num_edges],
            degree_min=[s.degree_min], degree_mean=[s.degree_mean], degree_max=[s.degree_max],
            spectral_gap=[s.spectral_gap])

    def setup(self, params: torch.Tensor, seeds: SeedTree, adversary: Adversary | None,
              world) -> GossipSetup:
        g = self.cfg.gossip
        model_bytes = params.numel() * params.element_size()
        return GossipSetup(self.cfg.rounds, g.steps, self.cfg.eval_every, g.eval_peers,
                           g.final_merge, seeds, byzantine_ids(adversary), world,
                           upload_bytes(self.plugins.compressor, model_bytes),
                           self.cfg.diverge_after, peer_schedule(self.cfg))

    def loop(self, pools, params, evaluator, logger, progress, seeds, adversary, world,
             keeper=None):
        return decentralized_rounds(self.setup(params, seeds, adversary, world), pools,
                                    world.network, evaluator, logger, progress, keeper)


class AsyncPeers(Peers):
    """Peers on Poisson clocks: pairwise exchanges on edges, or wake-ups that apply the
    consensus policy to a peer's live neighbourhood (engine/loops/async_gossip.py)."""

    def loop(self, pools, params, evaluator, logger, progress, seeds, adversary, world,
             keeper=None):
        a = self.cfg.gossip.asynchronous
        compressed = not self.plugins.compressor.lossless
        forged = adversary is not None and adversary.attack.forge is not None
        accelerated = self.consensus.accelerated is not None
        if accelerated and forged:
            raise ConfigError("attack with consensus=dadao: a forging attack runs wake-ups, and "
                              "DADAO's pairwise messages (y + z) have no wake-up form")
        pairwise = self.consensus.pairwise and not compressed and not forged
        return async_gossip_units(self.setup(params, seeds, adversary, world),
                                  Rates(a.edge_rate, a.step_rate, a.wake_rate), pools, world,
                                  evaluator, logger, progress, pairwise, compressed, keeper,
                                  accelerated)


class SampledPeers(Peers):
    """MoDeST: the world plans each round's sample, aggregators and W (engine/loops/
    sampling.py); the gossip round applies it."""

    def __init__(self, cfg: ExperimentConfig, plugins: Plugins, model: ModelSpec,
                 seeds: SeedTree) -> None:
        super().__init__(cfg, plugins, model, seeds)
        if cfg.gossip.mode == "async":
            raise ConfigError("gossip.mode=async with consensus=modest: MoDeST's rounds are "
                              "its protocol (a sample trains, aggregators wait for a share of "
                              "it); it has no Poisson-clock form")


def _dadao_settings(cfg: ExperimentConfig) -> None:
    """DADAO (policies/dadao.py) runs its own dynamics on Poisson clocks: refuse, in one line
    each, the settings it would not use."""
    if cfg.gossip.mode != "async":
        raise ConfigError("consensus=dadao: DADAO is asynchronous (computation and edge Poisson "
                          "clocks); allowed: gossip.mode=async")
    a, t = cfg.gossip.asynchronous, cfg.training
    defaults = {("gossip.asynchronous.edge_rate", a.edge_rate, type(a), "edge_rate"):
                "DADAO derives its edge rates from the graph (sqrt(2 chi_1 chi_2) / |E|)",
                ("gossip.asynchronous.step_rate", a.step_rate, type(a), "step_rate"):
                "DADAO's step sizes assume one computation event per node per unit (rate 1)",
                ("gossip.asynchronous.wake_rate", a.wake_rate, type(a), "wake_rate"):
                "DADAO has no wake-ups, only edge clocks",
                ("training.lr", t.lr, type(t), "lr"):
                "DADAO's step sizes derive from consensus.dadao.mu and L",
                ("training.momentum", t.momentum, type(t), "momentum"):
                "DADAO's own momentum is its ODE; allowed: 0",
                ("training.prox_mu", t.prox_mu, type(t), "prox_mu"):
                "DADAO takes plain minibatch gradients; allowed: 0",
                ("training.sam_rho", t.sam_rho, type(t), "sam_rho"):
                "DADAO takes plain minibatch gradients; allowed: 0"}
    for (key, value, model, name), why in defaults.items():
        if value != model.model_fields[name].default:
            raise ConfigError(f"{key}={value} with consensus=dadao: {why}; leave it unset")


def byzantine_ids(adversary: Adversary | None) -> np.ndarray:
    if adversary is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(adversary.byzantine).astype(np.int64)


def _peers(cfg: ExperimentConfig, gossip_mode: str | None, sampled: bool, consensus) -> bool:
    return (cfg.mode == "decentralized" and (consensus.sampling is not None) == sampled
            and gossip_mode in (None, cfg.gossip.mode))


def sync_gossip() -> ProtocolSpec:
    """Synchronous decentralized SGD (D-SGD; Lian et al., 2017): every online peer trains,
    then `gossip.steps` gossip steps with the consensus policy over the graph."""
    return ProtocolSpec(
        "sync_gossip", "sync gossip", "peers",
        selects=lambda cfg, rule, consensus: _peers(cfg, "sync", False, consensus),
        consumes=PEER_PARTS | {"participation", "selection", "deadline", "compression",
                               "local_steps", "dropouts", "link_failure", "topology",
                               "mixing", "gossip_steps"},
        build=Peers, example=PEER_EXAMPLE)


def async_gossip() -> ProtocolSpec:
    """Asynchronous gossip on Poisson clocks in virtual time (as DADAO's model, Nabli &
    Oyallon, 2023): edges exchange, peers step and wake up at their rates."""
    return ProtocolSpec(
        "async_gossip", "async gossip", "peers",
        selects=lambda cfg, rule, consensus: _peers(cfg, "async", False, consensus),
        consumes=PEER_PARTS | {"compression", "link_failure", "topology", "mixing", "clocks"},
        build=AsyncPeers,
        example={**PEER_EXAMPLE, "gossip": {"mode": "async", "eval_peers": 2}},
        why_not={
            "participation": "every online peer's clock runs; nobody selects K of them",
            "selection": "every online peer's clock runs; nobody selects peers",
            "deadline": "there are no rounds to close: events run in virtual time",
            "dropouts": "nobody is selected, so nobody drops out; crashes and availability "
                        "take peers offline",
            "local_steps": "each step event is one SGD step, at gossip.asynchronous.step_rate",
            "gossip_steps": "exchanges fire on the edges' clocks, at gossip.asynchronous."
                            "edge_rate",
        })


def modest() -> ProtocolSpec:
    """MoDeST (de Vos et al., 2023, "MoDeST: Bridging the Gap between Federated and
    Decentralized Learning with Decentralized Sampling"; policies/gossip.py `modest`): each
    round a seeded sample trains, and aggregators of the next sample average what arrives."""
    return ProtocolSpec(
        "modest", "MoDeST", "peers",
        selects=lambda cfg, rule, consensus: _peers(cfg, None, True, consensus),
        consumes=PEER_PARTS | {"deadline", "local_steps", "dropouts"},
        build=SampledPeers,
        example={**PEER_EXAMPLE, "consensus": {"modest": {"sample_size": 4}}},
        why_not={
            "participation": "its consensus.modest.sample_size is its participation",
            "selection": "every peer computes the sample from a shared seeded order, with no "
                         "coordinator to rank peers or close a round at K reports (its "
                         "success_fraction does that)",
            "compression": "a compressed message is a difference to a model both ends hold, "
                           "and MoDeST's aggregators change every round and need not hold the "
                           "model the trainers started from",
            "topology": "a sample is drawn from the whole population, not from a graph",
            "mixing": "the round's W comes from its sample and aggregators",
            "link_failure": "there is no graph; lost messages model the network",
            "gossip_steps": "each round's aggregate is handed on once",
            "clocks": "MoDeST's rounds are its protocol; it has no Poisson-clock form",
        })
