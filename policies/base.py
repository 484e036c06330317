"""The aggregation contract, in the style of Optax's GradientTransformation.

An aggregation policy is a chain of stages. Each stage is an `Aggregator(init, update)` of pure
functions with explicit state. A stage's `update` maps its input to its output:

    transform  : Updates    -> Updates      (e.g. per-client clipping)
    reduction  : Updates    -> Tensor [P]   (e.g. weighted mean, median)
    optimizer  : Tensor [P] -> Tensor [P]   (e.g. server SGD, Adam)
    aggregator : Updates    -> Tensor [P]   (a ready-made chain such as fedavg)

The chain's output is the global step: new_params = params + step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

State = Any  # a (nested) tuple of tensors; () for stateless stages
StageKind = Literal["transform", "reduction", "optimizer", "aggregator"]


class Aggregator(NamedTuple):
    init: Callable[[torch.Tensor], State]  # global params [P] -> initial state
    update: Callable[[Any, State], tuple[Any, State]]
    # the fewest updates the stage is defined on (Krum: 2f + 3); a server step with fewer
    # is skipped, and a protocol that always has fewer is refused
    min_updates: int = 1


def stage(kind: StageKind, permutation_invariant: bool = True, decomposable: bool = False,
          needs: tuple[str, ...] = (), mean_of_one: bool = False):
    """Mark a factory with the kind of stage it returns (read by the registry and the contract
    checker). `permutation_invariant=False` for rules that depend on client order;
    `decomposable=True` for reductions that only need sum(weights * deltas) (engine/core/tree.py),
    which pools may then pre-reduce instead of shipping every delta. `needs`: the columns of
    `Updates` the stage reads besides deltas and weights (label_counts, fisher, steps, losses,
    staleness); a protocol whose updates do not carry them is refused at load.
    `mean_of_one=True` for a transform or reduction that, on a single update, gives what the
    weighted mean gives (that update): over a protocol that aggregates one update per step the
    run then reduces to FedAvg's, and the engine says so (the contract checker tests it)."""

    def mark(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        factory.stage_kind = kind
        factory.permutation_invariant = permutation_invariant
        factory.decomposable = decomposable
        factory.needs = frozenset(needs)
        factory.mean_of_one = mean_of_one
        return factory

    return mark


def chain(*stages: Aggregator) -> Aggregator:
    """Run stages one after another, each with its own slot of the state tuple."""

    def init(params: torch.Tensor) -> State:
        return tuple(s.init(params) for s in stages)

    def update(x: Any, state: State) -> tuple[Any, State]:
        new_state = []
        for s, s_state in zip(stages, state, strict=True):
            x, s_state = s.update(x, s_state)
            new_state.append(s_state)
        return x, tuple(new_state)

    return Aggregator(init, update, max(s.min_updates for s in stages))


def stateless(fn: Callable[[Any], Any]) -> Aggregator:
    """A stage with no state from a plain function of its input."""
    return Aggregator(init=lambda params: (), update=lambda x, state: (fn(x), state))
