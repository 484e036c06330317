"""Names become objects once: every plugin a config names, resolved through its registry.

`resolve(cfg)` checks every plugin section's kind and parameters (one-line ConfigErrors that
name the key) and returns the objects the run is built from; past it no code looks at a
kind's name. `described(cfg)` is the config as the logs record it: each plugin with its
parameters and the factory's defaults. `CATALOG` tells the config loader which names are
kinds, so an override that switches a kind keeps the old kind's parameters under its name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from engine.compute.training import EXECUTORS
from engine.core.config import ExperimentConfig, PluginSection, load_config
from engine.core.errors import ConfigError
from engine.core.plugins import PluginSpec, Registry
from engine.core.seeds import SeedTree
from engine.protocols import protocol_of
from engine.protocols.base import Plugins, changed_paths, check_settings
from policies.asynchronous import SERVER_RULES
from policies.compression import COMPRESSORS, Compressor, ControlledUplink
from policies.registry import (
    AGGREGATION,
    CONSENSUS,
    build_consensus,
    chain_needs,
    consensus_spec,
    stage_specs,
)
from policies.selection import SELECTION
from policies.staleness import STALENESS
from scenarios.adversaries import ATTACKS
from scenarios.availability import AVAILABILITY
from scenarios.datasets import DATASETS
from scenarios.distributions import DISTRIBUTIONS
from scenarios.environments import ENVIRONMENT_ENTRIES
from scenarios.mixing import MIXING, column_stochastic
from scenarios.models import MODELS
from scenarios.partition import PARTITIONS
from scenarios.platforms import PLATFORMS
from scenarios.task import FederatedTask
from scenarios.task import build_task as scenario_task
from scenarios.topology import TOPOLOGIES

# config section -> the registry of its kind
SECTIONS: dict[str, Registry] = {
    "task": DATASETS, "task.model": MODELS, "partition": PARTITIONS,
    "population.availability": AVAILABILITY, "training.compression": COMPRESSORS,
    "selection": SELECTION, "server": SERVER_RULES, "attack": ATTACKS,
    "topology": TOPOLOGIES, "server.platform": PLATFORMS,
}
def _kinds(registry: Registry) -> dict[str, list[str]]:
    return {name: list(registry.parameters(registry[name])) for name in registry.names()}


DEVICE_QUANTITIES = ("step_s", "up_bps", "down_bps", "latency_s")
# every config path that names a plugin -> {kind: its parameters' names}
CATALOG: dict[str, dict[str, list[str]]] = {
    **{path: _kinds(registry) for path, registry in SECTIONS.items()},
    "server.staleness": _kinds(STALENESS),
    **{f"devices.{q}": _kinds(DISTRIBUTIONS) for q in DEVICE_QUANTITIES},
    "failures.crash.downtime": _kinds(DISTRIBUTIONS),
}


def section_spec(cfg: ExperimentConfig, path: str) -> PluginSpec:
    """The plugin a config section names, split into its kind's parameters and others'."""
    section: PluginSection = _at(cfg, path)
    return SECTIONS[path].section(section.chosen, section.items, path,
                                  f"{path}.{section.KIND_KEY}")


def _at(cfg: ExperimentConfig, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def resolve(cfg: ExperimentConfig) -> Plugins:
    """Every plugin of `cfg` as an object; a bad kind or parameter is one ConfigError line."""
    seeds, n = SeedTree(cfg.seed), cfg.population.num_clients
    built = {path: SECTIONS[path].build(section_spec(cfg, path), num_clients=n, seeds=seeds)
             for path in SECTIONS}
    mixing = MIXING.build(MIXING.spec(cfg.gossip.mixing, "gossip.mixing"))
    aggregation = stage_specs(cfg.aggregation)
    for spec in aggregation:  # checked here; built once the model is known
        AGGREGATION.validated(spec.kind, spec.params, spec.where)
    consensus = build_consensus(consensus_spec(cfg.consensus), column_stochastic(mixing))
    protocol = protocol_of(cfg, built["server"], consensus)
    check_settings(cfg, protocol)
    controlled_uplink(cfg, built["training.compression"])
    if acting(built["task"]):
        check_acting(cfg, built, aggregation)
    attack = built["attack"]
    mode_fits = attack.for_servers if cfg.mode == "federated" else attack.for_peers
    if not mode_fits:
        fitting = [k for k in ATTACKS.names() if _fits(k, cfg.mode)]
        raise ConfigError(f"attack.kind={cfg.attack.kind} does not apply to {cfg.mode} runs; "
                          f"allowed: {', '.join(fitting)}")
    return Plugins(
        dataset=built["task"], model=built["task.model"], partition=built["partition"],
        executor=EXECUTORS.build(EXECUTORS.spec(cfg.training.executor, "training.executor")),
        compressor=built["training.compression"], selection=built["selection"],
        availability=built["population.availability"],
        devices={q: DISTRIBUTIONS.build(DISTRIBUTIONS.spec(getattr(cfg.devices, q),
                                                           f"devices.{q}"))
                 for q in DEVICE_QUANTITIES},
        downtime=None if cfg.failures.crash.downtime is None else DISTRIBUTIONS.build(
            DISTRIBUTIONS.spec(cfg.failures.crash.downtime, "failures.crash.downtime")),
        server=built["server"], attack=attack, topology=built["topology"], mixing=mixing,
        aggregation=aggregation, consensus=consensus, protocol=protocol,
        platform=built["server.platform"],
    )


def controlled_uplink(cfg: ExperimentConfig, compressor: Compressor) -> ControlledUplink | None:
    """SCALLION or SCAFCOM's message rule from `training.compression` (None: the delta is
    compressed, with error feedback if set); a setting that the chosen scheme does not use is
    one ConfigError line."""
    section, where = cfg.training.compression, "training.compression"
    scheme = section.controlled
    for key, user in (("alpha", "scallion"), ("beta", "scafcom")):
        if getattr(section, key) is not None and scheme != user:
            raise ConfigError(f"{where}.{key}: only {user.upper()} uses it ({where}.controlled:"
                              f" {user}); got controlled={scheme}")
    if scheme is None:
        return None
    if not cfg.training.scaffold:
        raise ConfigError(f"{where}.controlled={scheme}: it compresses SCAFFOLD's uplink; set "
                          "training.scaffold: true")
    if not section.error_feedback:
        raise ConfigError(f"{where}.error_feedback: {scheme.upper()} keeps no residual (c_i "
                          "is its memory of what was sent); remove it")
    if scheme == "scafcom":
        if section.beta is None:
            raise ConfigError(f"{where}.controlled=scafcom needs {where}.beta (its momentum "
                              "weight, 0 < beta <= 1)")
        return ControlledUplink(alpha=1.0, beta=section.beta, contract=True)
    if not compressor.lossless and compressor.omega is None:
        raise ConfigError(f"{where}.controlled=scallion: {where}.kind={section.kind} is not an "
                          "unbiased compressor with a variance bound (qsgd, randomk with "
                          "unbiased: true); SCAFCOM (controlled: scafcom) takes biased ones")
    return ControlledUplink(alpha=section.alpha)


# what a task learnt by acting (PPO in each client's environment) does without, and why
_NOT_ACTING = {
    "partition": "every client owns an environment, not a share of a dataset",
    "task.test_fraction": "the model is scored on held-out environments (test_envs)",
    "task.max_test_samples": "the model is scored on held-out environments (test_envs)",
    "task.validation_fraction": "there are no samples to hold out",
    "gossip.peer_test_samples": "peers are scored on the held-out environments",
    "training.executor": "PPO acts and learns in the clients' environments",
    "training.momentum": "PPO's steps are Adam's",
    "training.prox_mu": "PPO's objective has no proximal term here",
    "training.scaffold": "PPO's steps take no control variate",
    "training.sam_rho": "PPO's steps are Adam's, not SAM's",
    "training.freeze_features": "PPO trains the whole actor-critic",
    "training.max_local_steps": "PPO takes epochs x minibatches steps",
    "training.min_local_steps": "PPO takes epochs x minibatches steps",
}


def acting(dataset) -> bool:
    """Whether a resolved `task.dataset` is an environment (its clients learn by acting)."""
    return getattr(dataset, "func", dataset) in ENVIRONMENT_ENTRIES


def check_acting(cfg: ExperimentConfig, built: dict, aggregation) -> None:
    """One ConfigError line for a setting that a task learnt by acting would not use."""
    task = f"task.dataset={cfg.task.dataset} (clients learn by acting)"
    for path in changed_paths(cfg):
        for prefix, why in _NOT_ACTING.items():
            if path == prefix or path.startswith(prefix + "."):
                raise ConfigError(f"{path}: {task} does not use it ({why}); remove it")
    needs = chain_needs(aggregation) & {"label_counts", "fisher", "validation"}
    if needs:
        raise ConfigError(f"aggregation: {task} has no {' or '.join(sorted(needs))} "
                          "(a stage of the chain reads it from the clients' data)")
    if built["attack"].poisons_labels:
        raise ConfigError(f"attack.kind={cfg.attack.kind}: {task} has no labels to flip; "
                          "attacks on updates apply (sign_flip, gaussian, alie, ipm, min_max)")
    if built["population.availability"].chooses_steps:
        raise ConfigError(f"population.availability.kind={cfg.population.availability.kind}: "
                          f"{task} takes PPO's steps, not the clients' own")


def _fits(kind: str, mode: str) -> bool:
    attack = ATTACKS.build(PluginSpec(kind, {}, {}, "attack", "attack.kind"))
    return attack.for_servers if mode == "federated" else attack.for_peers


def described(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as the logs record it: every section, each plugin with its parameters and
    the defaults its factory gives them (parameters kept for other kinds stay as written)."""
    out = cfg.to_dict()
    for path, registry in SECTIONS.items():
        section = _at(cfg, path)
        node = out
        for part in path.split(".")[:-1]:
            node = node[part]
        name = path.split(".")[-1]
        fixed = {k: v for k, v in node[name].items() if k in type(section).model_fields}
        node[name] = {**fixed, **registry.describe(section_spec(cfg, path), section.KIND_KEY)}
    out["aggregation"] = [{s.kind: _params(AGGREGATION, s)} for s in stage_specs(cfg.aggregation)]
    consensus = consensus_spec(cfg.consensus)
    out["consensus"] = [{consensus.kind: _params(CONSENSUS, consensus)}]
    return out


def _params(registry: Registry, spec: PluginSpec) -> dict[str, Any]:
    described_ = registry.describe(spec)
    described_.pop("kind")
    return described_


def config_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(described(cfg), sort_keys=False)


def digest(cfg: ExperimentConfig) -> str:
    """A stable hash of the resolved config (what defines the results, not the runtime)."""
    return hashlib.sha256(json.dumps(described(cfg), sort_keys=True).encode()).hexdigest()


def load(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read, override, validate and resolve a scenario config (every error before any run
    starts)."""
    cfg = load_config(path, overrides, CATALOG)
    resolve(cfg)
    return cfg


def build_task(cfg: ExperimentConfig, plugins: Plugins | None = None) -> FederatedTask:
    """The run's task (data, partition, model) from the seed tree."""
    plugins = plugins or resolve(cfg)
    return scenario_task(plugins.dataset, plugins.partition, plugins.model,
                         cfg.population.num_clients, SeedTree(cfg.seed), cfg.task.test_fraction,
                         cfg.task.max_test_samples, cfg.task.model.supermask,
                         cfg.task.validation_fraction)
