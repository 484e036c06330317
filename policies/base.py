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

from policies.tree import TreeSums

State = Any  # a (nested) tuple of tensors; () for stateless stages
StageKind = Literal["transform", "reduction", "optimizer", "aggregator"]


class Updates(NamedTuple):
    """K clients' results for one aggregation, ordered by client id.

    When the aggregation is decomposable (`stage(..., decomposable=True)`), pools pre-reduce:
    `deltas` is None and `weighted_sums` holds their partial sums of weights * deltas.
    """

    deltas: torch.Tensor | None  # [K, P] float32: local params - global params
    weights: torch.Tensor  # [K] float32 (FedAvg: number of local samples)
    client_ids: torch.Tensor  # [K] int64
    losses: torch.Tensor  # [K] float32 mean local training loss
    num_samples: torch.Tensor  # [K] int64 local training samples
    steps: torch.Tensor | None = None  # [K] int64 local SGD steps taken
    label_counts: torch.Tensor | None = None  # [K, classes] int64 local training labels
    fisher: torch.Tensor | None = None  # [K, P] float32 diagonal Fisher of the local model
    weighted_sums: TreeSums | None = None

    @property
    def num_clients(self) -> int:
        return int(self.client_ids.numel())

    def per_client(self) -> tuple[torch.Tensor | None, ...]:
        return self[:8]

    def take(self, index: torch.Tensor) -> Updates:
        """Rows `index` of the per-client columns (partial sums are kept as they are)."""
        columns = [None if c is None else c[index] for c in self.per_client()]
        return Updates(*columns, weighted_sums=self.weighted_sums)

    @staticmethod
    def empty() -> Updates:
        """No client reported (every selected one failed): the round has nothing to add."""
        return Updates(None, torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                       torch.zeros(0, dtype=torch.int64))

    @staticmethod
    def concat(parts: list[Updates]) -> Updates:
        """Join pools' updates and order them by client id (the reduction order is fixed)."""
        columns = [None if c[0] is None else torch.cat(c)
                   for c in zip(*(u.per_client() for u in parts), strict=True)]
        sums = [u.weighted_sums for u in parts if u.weighted_sums is not None]
        joined = Updates(*columns, weighted_sums=TreeSums.concat(sums) if sums else None)
        return joined.take(torch.argsort(joined.client_ids, stable=True))


class Aggregator(NamedTuple):
    init: Callable[[torch.Tensor], State]  # global params [P] -> initial state
    update: Callable[[Any, State], tuple[Any, State]]


def stage(kind: StageKind, permutation_invariant: bool = True, decomposable: bool = False):
    """Mark a factory with the kind of stage it returns (read by the registry and the contract
    checker). `permutation_invariant=False` for rules that depend on client order;
    `decomposable=True` for reductions that only need sum(weights * deltas) (policies/tree.py),
    which pools may then pre-reduce instead of shipping every delta."""

    def mark(factory: Callable[..., Aggregator]) -> Callable[..., Aggregator]:
        factory.stage_kind = kind
        factory.permutation_invariant = permutation_invariant
        factory.decomposable = decomposable
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

    return Aggregator(init, update)


def stateless(fn: Callable[[Any], Any]) -> Aggregator:
    """A stage with no state from a plain function of its input."""
    return Aggregator(init=lambda params: (), update=lambda x, state: (fn(x), state))
