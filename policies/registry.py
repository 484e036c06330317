"""Registries of aggregation stages and consensus policies (Gymnasium-style: explicit dicts
of name -> factory).

Configs name a plugin by registry name or by an out-of-tree "package.module:attr" path whose
factory is marked (`policies.base.stage` or `policies.consensus.consensus_policy`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from engine.core.config import StageSpec, call_validated
from engine.core.errors import ConfigError
from policies import gossip, optimizers, robust, transforms, weighting
from policies.aggregation import fedavg, server_sgd, weighted_mean
from policies.base import Aggregator, chain
from policies.consensus import Consensus
from policies.fedau import fedau
from policies.flag import flag_aggregator
from policies.frl import frl
from policies.privacy import dp_gaussian

Factory = Callable[..., Aggregator]

AGGREGATION: dict[str, Factory] = {
    # reductions
    "weighted_mean": weighted_mean,
    "coordinate_median": robust.coordinate_median,
    "trimmed_mean": robust.trimmed_mean,
    "krum": robust.krum,
    "multi_krum": robust.multi_krum,
    "geometric_median": robust.geometric_median,
    "centered_clipping": robust.centered_clipping,
    "bulyan": robust.bulyan,
    "flag_aggregator": flag_aggregator,
    "dp_gaussian": dp_gaussian,
    "fisher_merge": weighting.fisher_merge,
    # transforms
    "clip_per_client": transforms.clip_per_client,
    "nnm": transforms.nnm,
    "bucketing": transforms.bucketing,
    # weightings (transforms that set each client's weight)
    "uniform_weights": weighting.uniform_weights,
    "sample_weights": weighting.sample_weights,
    "feddisco": weighting.feddisco,
    "mwa": weighting.mwa,
    # server optimizers
    "server_sgd": server_sgd,
    "server_momentum": optimizers.server_momentum,
    "diloco_outer": optimizers.diloco_outer,
    "server_adagrad": optimizers.server_adagrad,
    "server_adam": optimizers.server_adam,
    "server_yogi": optimizers.server_yogi,
    # ready-made chains
    "fedavg": fedavg,
    "fedavgm": optimizers.fedavgm,
    "fedadam": optimizers.fedadam,
    "fedau": fedau,
    "frl": frl,
}

CONSENSUS: dict[str, Callable[..., Consensus]] = {
    "gossip": gossip.gossip,
    "push_sum": gossip.push_sum,
    "variance_corrected": gossip.variance_corrected,
    "clipped_gossip": gossip.clipped_gossip,
    "monna": gossip.monna,
    "modest": gossip.modest,
}

# Allowed order of stage kinds in a chain: transforms, one reduction, then optimizers.
_RANK = {"transform": 0, "reduction": 1, "aggregator": 1, "optimizer": 2}


def _lookup(name: str, where: str, registry: dict[str, Callable], noun: str) -> Callable:
    if ":" not in name:
        if name in registry:
            return registry[name]
        allowed = ", ".join(sorted(registry))
        raise ConfigError(f"{where}: unknown {noun} {name!r}; allowed: {allowed} or pkg.mod:attr")
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{where}: cannot import {name!r}") from None


def resolve(name: str, where: str) -> Factory:
    factory = _lookup(name, where, AGGREGATION, "stage")
    if getattr(factory, "stage_kind", None) not in _RANK:
        raise ConfigError(f"{where}: {name!r} is not marked with policies.base.stage(kind)")
    return factory


def pools_may_reduce(specs: list[StageSpec]) -> bool:
    """True when the chain starts with a decomposable reduction: pools then send partial sums
    of weights * deltas (hierarchical aggregation) instead of every client's delta."""
    return bool(getattr(resolve(specs[0].name, "aggregation[0]"), "decomposable", False))


def pools_compute_fisher(specs: list[StageSpec]) -> bool:
    """True when a stage of the chain merges with Fisher weights (clients then return their
    local model's diagonal Fisher)."""
    return any(getattr(resolve(s.name, f"aggregation[{i}]"), "needs_fisher", False)
               for i, s in enumerate(specs))


# Stage parameters the engine sets, never the config, and where their values come from.
_ENGINE_SET = {"num_clients": "population", "supermask_layers": "model"}


def _engine_kwargs(factory: Factory, spec: StageSpec, engine: dict[str, object],
                   where: str) -> dict:
    """Fill the stage's parameters named in _ENGINE_SET: `num_clients` (the population size),
    `supermask_layers` (the edges of each layer of a supermask model, () for a dense one).
    A None value leaves the factory's default."""
    kwargs = dict(spec.kwargs)
    for name in sorted(engine.keys() & inspect.signature(factory).parameters.keys()):
        if name in spec.kwargs:
            raise ConfigError(f"{where}.{name}: set by the {_ENGINE_SET[name]}, "
                              "not in the config")
        if engine[name] is not None:
            kwargs[name] = engine[name]
    return kwargs


def _check_order(factories: list[Factory]) -> None:
    ranks = [_RANK[f.stage_kind] for f in factories]
    if ranks != sorted(ranks) or ranks.count(1) != 1:
        raise ConfigError(
            "aggregation: a chain is transforms, then exactly one reduction or aggregator, "
            f"then optimizers; got kinds {[f.stage_kind for f in factories]}"
        )
    if any(getattr(f, "sets_global_model", False) for f in factories[:-1]):
        raise ConfigError("aggregation: a stage that sets the global model itself (frl) must "
                          "be the last one: no optimizer after it")


def build_aggregator(specs: list[StageSpec], num_clients: int | None = None,
                     supermask_layers: tuple[int, ...] | None = None) -> Aggregator:
    """Validate the chain's order and parameters, then compose it. `num_clients` (the
    population size) and `supermask_layers` (ModelSpec.supermask_layers) fill the parameters
    of those names of stages that have one (fedau, frl)."""
    factories = [resolve(s.name, f"aggregation[{i}]") for i, s in enumerate(specs)]
    _check_order(factories)
    engine = {"num_clients": num_clients, "supermask_layers": supermask_layers}
    wheres = [f"aggregation[{i}].{s.name}" for i, s in enumerate(specs)]
    stages = [call_validated(f, _engine_kwargs(f, s, engine, where), where)
              for f, s, where in zip(factories, specs, wheres, strict=True)]
    return stages[0] if len(stages) == 1 else chain(*stages)


def build_consensus(specs: list[StageSpec], mixing: str) -> Consensus:
    """The one consensus policy of a decentralized run, checked against the mixing weights."""
    if len(specs) != 1:
        raise ConfigError(f"consensus: exactly one policy, got {len(specs)}")
    (spec,) = specs
    factory = _lookup(spec.name, "consensus", CONSENSUS, "policy")
    if not hasattr(factory, "mean_preserving"):
        raise ConfigError(f"consensus: {spec.name!r} is not marked with "
                          "policies.consensus.consensus_policy")
    if factory.needs_column_stochastic != (mixing == "push_sum"):
        raise ConfigError(f"consensus={spec.name} with gossip.mixing={mixing}: push_sum "
                          "consensus and push_sum mixing go together")
    return call_validated(factory, spec.kwargs, f"consensus.{spec.name}")
