"""What a protocol is: a declaration of the parts of a config it consumes, and a factory of
the runner that wires its world, pools and round loop.

A *part* is a plugin kind or a world model, named by the config paths that set it (PARTS).
Config paths in no part (the task, the population's size and availability, devices,
crashes, churn, lost messages, the learning rate, the attack, ...) are every protocol's.
A protocol lists the parts it consumes; a config that sets any other part to something other
than its default is refused at load time, in one line naming the key and the protocol
(`unused_setting`). Defaults are never refused: a config logged with every value written
out (the runs table's `config_yaml`) loads again as it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from typing import Protocol as Interface

import numpy as np
import torch

from engine.backends.runtime import Pools, RuntimeOptions
from engine.compute.evaluation import Evaluator
from engine.compute.pool import PoolSpec
from engine.compute.training import LocalSGD
from engine.core.config import ExperimentConfig
from engine.core.errors import ConfigError
from engine.core.plugins import PluginSpec
from engine.core.seeds import SeedTree
from engine.loops.keeper import Keeper
from engine.loops.skeleton import LoopResult
from engine.records.logs import RunLogger, RunRows
from engine.records.progress import RoundProgress
from policies.asynchronous import ServerRule
from policies.compression import Compressor
from policies.consensus import Consensus
from policies.selection import Selection
from scenarios.adversaries import Adversary, Attack
from scenarios.availability import Availability
from scenarios.distributions import Distribution
from scenarios.mixing import Mixing
from scenarios.models import ModelSpec
from scenarios.platforms import Platform
from scenarios.task import FederatedTask


@dataclass(frozen=True)
class Plugins:
    """The objects a run is built from (kinds resolved, parameters checked), and the protocol
    they select."""

    dataset: Callable  # (num_clients, rng) -> Samples
    model: Callable  # an architecture: (input_shape, classes, linear, conv) -> layers
    partition: Callable  # (labels, num_clients, rng, natural_owner) -> owner
    executor: Callable  # (model, spec) -> executor
    compressor: Compressor
    selection: Selection
    availability: Availability
    devices: dict[str, Distribution]
    downtime: Distribution | None
    server: ServerRule
    attack: Attack
    topology: Callable  # (num_nodes, rng) -> Graph
    mixing: Mixing
    aggregation: list[PluginSpec]  # built with the model's layer sizes: build_aggregator
    consensus: Consensus
    protocol: ProtocolSpec
    platform: Platform  # sync FL: the aggregators' timing model (scenarios/platforms.py)


# part -> the config paths that set it (a path covers everything under it; the longest
# matching path decides, so `selection.deadline_s` is the deadline, not the selection)
PARTS: dict[str, tuple[str, ...]] = {
    "server": ("server",),
    "platform": ("server.platform",),
    "aggregation": ("aggregation",),
    "participation": ("population.participation",),
    "selection": ("selection",),
    "deadline": ("selection.deadline_s",),
    "scaffold": ("training.scaffold",),
    "compression": ("training.compression",),
    "streaming": ("training.streaming",),
    "error_feedback": ("training.compression.error_feedback",),
    "controlled_compression": ("training.compression.controlled", "training.compression.alpha",
                               "training.compression.beta"),
    "local_steps": ("training.local_epochs", "training.max_local_steps",
                    "training.min_local_steps"),
    "dropouts": ("failures.dropout_before", "failures.dropout_after"),
    "link_failure": ("failures.link_failure",),
    "topology": ("topology",),
    "mixing": ("gossip.mixing",),
    "gossip_steps": ("gossip.steps", "gossip.schedule"),
    "clocks": ("gossip.asynchronous",),
    "gossip": ("gossip",),  # the peers' own settings: init, final merge, their evaluation
    "consensus": ("consensus",),
}
_PART_OF_PATH = {path: part for part, paths in PARTS.items() for path in paths}

# What an `Updates` can carry beyond deltas and weights (engine/core/updates.py); a stage
# declares the columns it reads (`needs`), a protocol the columns its updates carry.
UPDATE_COLUMNS = frozenset({"losses", "steps", "label_counts", "fisher", "staleness"})


class Runner(Interface):
    """A protocol's run, built from the config once its task exists (engine/experiment.py)."""

    fisher: bool  # the pools compute clients' diagonal Fishers
    label_counts: bool  # the pools count clients' training labels per class (FedDisco)
    notes: tuple[str, ...]  # one-line notes shown once at start (a reduction to another rule)

    def world(self, seeds: SeedTree, task: FederatedTask, hp: LocalSGD,
              params: torch.Tensor) -> Any: ...

    def pools(self, task: FederatedTask, spec: PoolSpec, options: RuntimeOptions,
              params: torch.Tensor, adversary: Adversary | None, seeds: SeedTree) -> Pools: ...

    def describe(self, row: RunRows, world: Any) -> RunRows: ...

    def loop(self, pools: Pools, params: torch.Tensor, evaluator: Evaluator,
             logger: RunLogger, progress: RoundProgress, seeds: SeedTree,
             adversary: Adversary | None, world: Any, keeper: Keeper | None = None
             ) -> LoopResult: ...


@dataclass(frozen=True)
class ProtocolSpec:
    """A protocol as the engine knows it.

    `selects(cfg, server, consensus)`: whether today's keys (`mode`, `server.mode`,
    `gossip.mode`, a sampling consensus) choose it. `consumes`: its parts (PARTS).
    `why_not`: for a part it does not consume, the reason a refusal gives. `build`: its runner.
    `example`: the config sections that select it on a tiny task (the compatibility matrix's
    column); None keeps it out of the matrix (a catch-all for out-of-tree server rules)."""

    name: str
    label: str
    family: Literal["federated", "peers"]
    selects: Callable[[ExperimentConfig, ServerRule, Consensus], bool]
    consumes: frozenset[str]
    build: Callable[[ExperimentConfig, Plugins, ModelSpec, SeedTree], Runner]
    example: Mapping[str, Any] | None = None
    why_not: Mapping[str, str] = field(default_factory=dict)
    provides: frozenset[str] = UPDATE_COLUMNS

    @property
    def federated(self) -> bool:
        return self.family == "federated"

    def uses(self, part: str | None) -> bool:
        """Whether the protocol consumes `part` (None: a path every protocol consumes)."""
        return part is None or part in self.consumes


def part_of(path: str) -> str | None:
    """The part a dotted config path sets (None: every protocol's)."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        part = _PART_OF_PATH.get(".".join(parts[:i]))
        if part is not None:
            return part
    return None


_DEFAULTS = ExperimentConfig().to_dict()


def changed_paths(cfg: ExperimentConfig) -> list[str]:
    """The dotted paths where `cfg` differs from the schema's defaults (a plugin's parameters
    count under their own path, e.g. `selection.d`)."""
    return _diff(cfg.to_dict(), _DEFAULTS, "")


def _diff(value: Any, default: Any, where: str) -> list[str]:
    if isinstance(value, dict) and isinstance(default, dict):
        out = []
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            out += _diff(item, default[key], path) if key in default else [path]
        return out
    return [] if _same(value, default) else [where]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and \
            np.float64(a) == np.float64(b)
    return a == b


def check_settings(cfg: ExperimentConfig, protocol: ProtocolSpec) -> None:
    """A setting of a part the protocol does not consume is one ConfigError line naming the
    key, the protocol and why."""
    for path in changed_paths(cfg):
        part = part_of(path)
        if protocol.uses(part):
            continue
        why = protocol.why_not.get(part) or _GENERIC.get(part, "") or \
            f"it has no {part.replace('_', ' ')}"
        raise ConfigError(f"{path}: {protocol.label} does not use it ({why}); remove it, or "
                          f"choose a protocol that does: {', '.join(users_of(part))}")


# why a whole family does without a part
_GENERIC = {
    "server": "peers have no server",
    "platform": "peers have no server to host aggregators",
    "streaming": "Streaming DiLoCo's outer step runs on a server",
    "aggregation": "peers have no server to aggregate; consensus sets how they mix",
    "scaffold": "SCAFFOLD's controls live on a server",
    "controlled_compression": "SCALLION and SCAFCOM compress SCAFFOLD's uplink to a server",
    "topology": "clients talk to a server, not over a graph",
    "mixing": "clients talk to a server, not over a graph",
    "gossip_steps": "clients talk to a server; there is no gossip",
    "clocks": "clients talk to a server; there is no gossip",
    "gossip": "clients talk to a server; there is no gossip",
    "consensus": "clients talk to a server; aggregation sets how it combines them",
    "link_failure": "clients talk to a server, not over a graph's links",
}

_USERS: dict[str, list[str]] = {}


def users_of(part: str) -> list[str]:
    """The labels of the registered protocols that consume `part` (filled by the registry)."""
    return _USERS.get(part, [])


def register_users(protocols: list[ProtocolSpec]) -> None:
    _USERS.clear()
    for p in protocols:
        for part in p.consumes:
            _USERS.setdefault(part, []).append(p.label)

