"""Registries of aggregation stages and consensus policies, and the aggregation chain.

A config names a stage or policy by registry name, or an out-of-tree factory by
"package.module:attr" marked like the built-in ones (`policies.base.stage` or
`policies.consensus.consensus_policy`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from engine.core.errors import ConfigError
from engine.core.plugins import PluginSpec, Registry
from engine.core.seeds import SeedTree
from policies import (
    anarchic,
    dadao,
    gossip,
    merging,
    optimizers,
    peer_ranked,
    robust,
    streaming,
    transforms,
    weighting,
)
from policies.aggregation import fedavg, server_sgd, weighted_mean
from policies.base import Aggregator, chain
from policies.consensus import Consensus
from policies.fedau import fedau
from policies.flag import flag_aggregator
from policies.frl import frl
from policies.privacy import dp_gaussian

# Allowed order of stage kinds in a chain: transforms, one reduction, then optimizers.
_RANK = {"transform": 0, "reduction": 1, "aggregator": 1, "optimizer": 2}


def _is_stage(factory: Callable) -> str | None:
    if getattr(factory, "stage_kind", None) in _RANK:
        return None
    return "is not marked with policies.base.stage(kind)"


def _is_consensus(factory: Callable) -> str | None:
    if hasattr(factory, "mean_preserving"):
        return None
    return "is not marked with policies.consensus.consensus_policy"


# Stage parameters the engine fills, never the config: the population size, the model's
# parameter tensor sizes, a supermask model's layer sizes, a seed from the run's seed tree
# (stream aggregation.<position>), and the scorer of the task's validation split.
AGGREGATION: Registry[Aggregator] = Registry("stage", {
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
    "model_stock": merging.model_stock,
    "greedy_soup": merging.greedy_soup,
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
    "streaming_diloco_outer": streaming.streaming_diloco_outer,
    "server_adagrad": optimizers.server_adagrad,
    "server_adam": optimizers.server_adam,
    "server_yogi": optimizers.server_yogi,
    # ready-made chains
    "fedavg": fedavg,
    "fedavgm": optimizers.fedavgm,
    "fedadam": optimizers.fedadam,
    "fedau": fedau,
    "afa_cd": anarchic.afa_cd,
    "afa_cs": anarchic.afa_cs,
    "frl": frl,
    "uniform_soup": merging.uniform_soup,
}, engine=("num_clients", "layer_sizes", "supermask_layers", "seed", "validation", "fragments"),
    check=_is_stage)

CONSENSUS: Registry[Consensus] = Registry("policy", {
    "gossip": gossip.gossip,
    "push_sum": gossip.push_sum,
    "variance_corrected": gossip.variance_corrected,
    "clipped_gossip": gossip.clipped_gossip,
    "monna": gossip.monna,
    "modest": gossip.modest,
    "peer_ranked": peer_ranked.peer_ranked,
    "bristle": peer_ranked.bristle,
    "dadao": dadao.dadao,
}, check=_is_consensus)


def stage_specs(value: Any) -> list[PluginSpec]:
    """An `aggregation` value (a stage, or a list of stages) as one spec per stage."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError("aggregation: an empty chain; name at least one stage")
    specs = [AGGREGATION.spec(item, f"aggregation[{i}]") for i, item in enumerate(items)]
    _check_order([AGGREGATION.factory(s.kind, s.kind_where) for s in specs])
    return specs


def _factories(specs: Sequence[PluginSpec]) -> list[Callable]:
    return [AGGREGATION.factory(s.kind, s.kind_where) for s in specs]


def pools_may_reduce(specs: Sequence[PluginSpec]) -> bool:
    """True when the chain starts with a decomposable reduction: pools then send partial sums
    of weights * deltas (hierarchical aggregation) instead of every client's delta."""
    return bool(getattr(_factories(specs)[0], "decomposable", False))


def pools_compute_fisher(specs: Sequence[PluginSpec]) -> bool:
    """True when a stage of the chain merges with Fisher weights (clients then return their
    local model's diagonal Fisher)."""
    return "fisher" in chain_needs(specs)


def chain_needs(specs: Sequence[PluginSpec]) -> frozenset[str]:
    """The columns of `Updates` the chain's stages read (their `needs`)."""
    return frozenset().union(*(getattr(f, "needs", frozenset()) for f in _factories(specs)))


def on_one_update(specs: Sequence[PluginSpec]) -> str | None:
    """What the chain is when every step aggregates a single update, if that is another
    chain: each transform and reduction that gives the update's weighted mean on one update
    (`mean_of_one`) drops out, a reduction becoming the weighted mean. None when the chain
    stays itself (or a stage is not the mean on one update)."""
    dropped, kept, reduction = [], [], False
    for spec, factory in zip(specs, _factories(specs), strict=True):
        if factory.stage_kind not in ("transform", "reduction"):
            kept.append(spec.kind)
            continue
        if not getattr(factory, "mean_of_one", False):
            return None
        reduction = reduction or factory.stage_kind == "reduction"
        if spec.kind != "weighted_mean":
            dropped.append(spec.kind)
    if not dropped:
        return None
    kept = (["weighted_mean"] if reduction else []) + kept
    if kept == ["weighted_mean"]:
        return "fedavg"
    return kept[0] if len(kept) == 1 else f"[{', '.join(kept)}]"


def noise_multipliers(specs: Sequence[PluginSpec]) -> list[float]:
    """The noise multiplier of every stage that is a sampled Gaussian mechanism (marked with
    `noise_parameter`): the privacy accountant composes them."""
    out = []
    for spec, factory in zip(specs, _factories(specs), strict=True):
        name = getattr(factory, "noise_parameter", None)
        if name is not None:
            params = AGGREGATION.validated(spec.kind, spec.params, spec.where)
            out.append(float(params.get(name, AGGREGATION.parameters(factory)[name].default)))
    return out


def synchronous_only(specs: Sequence[PluginSpec]) -> str | None:
    """Why the chain needs synchronous rounds (a stage's `synchronous_only` reason), if so."""
    for factory in _factories(specs):
        reason = getattr(factory, "synchronous_only", None)
        if reason:
            return reason
    return None


def _check_order(factories: list[Callable]) -> None:
    ranks = [_RANK[f.stage_kind] for f in factories]
    if ranks != sorted(ranks) or ranks.count(1) != 1:
        raise ConfigError(
            "aggregation: a chain is transforms, then exactly one reduction or aggregator, "
            f"then optimizers; got kinds {[f.stage_kind for f in factories]}"
        )
    if any(getattr(f, "sets_global_model", False) for f in factories[:-1]):
        raise ConfigError("aggregation: a stage that sets the global model itself (frl, "
                          "greedy_soup) must be the last one: no optimizer after it")


def build_aggregator(specs: Sequence[PluginSpec], num_clients: int | None = None,
                     supermask_layers: tuple[int, ...] | None = None,
                     seeds: SeedTree | None = None, *,
                     layer_sizes: tuple[int, ...] | None = None,
                     validation: Callable[[Any], float] | None = None,
                     fragments: int | None = None) -> Aggregator:
    """The chain of `specs`, composed. The engine's values fill the stages' parameters of
    those names: `num_clients` (the population size), `layer_sizes` (ModelSpec.layer_sizes:
    each parameter tensor's size), `supermask_layers` (ModelSpec.supermask_layers), `seed`, a
    stage's own stream of the run's seed tree (`aggregation.<name>`, at its position in the
    chain), `validation` (a model's accuracy on the task's validation split, for stages that
    need "validation") and `fragments` (Streaming DiLoCo's P, training.streaming)."""
    seeds = seeds or SeedTree(0)
    stages = []
    for i, spec in enumerate(specs):
        engine = {"num_clients": num_clients, "supermask_layers": supermask_layers,
                  "layer_sizes": layer_sizes, "validation": validation,
                  "seed": seeds.integer(f"aggregation.{spec.kind}", i), "fragments": fragments}
        stages.append(AGGREGATION.build(spec, **{k: v for k, v in engine.items()
                                                 if v is not None}))
    return stages[0] if len(stages) == 1 else chain(*stages)


def consensus_spec(value: Any) -> PluginSpec:
    """A `consensus` value (one policy; a one-element list is accepted) as a spec."""
    if isinstance(value, list):
        if len(value) != 1:
            raise ConfigError(f"consensus: exactly one policy, got {len(value)}")
        (value,) = value
    return CONSENSUS.spec(value, "consensus")


def build_consensus(spec: PluginSpec, column_stochastic: bool) -> Consensus:
    """The consensus policy, checked against the mixing weights (push-sum needs column-
    stochastic weights, and the others row-stochastic ones)."""
    factory = CONSENSUS.factory(spec.kind, spec.kind_where)
    if factory.needs_column_stochastic != column_stochastic:
        raise ConfigError(f"consensus={spec.kind} with this gossip.mixing: push_sum "
                          "consensus and push_sum mixing go together")
    return CONSENSUS.build(spec)
