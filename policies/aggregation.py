"""Server-side aggregation stages: FedAvg = chain(weighted_mean(), server_sgd(lr))."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from engine.core import tree
from engine.core.tree import TreeSums
from engine.core.updates import Updates
from policies.base import Aggregator, chain, stage, stateless


def weighted_sums(updates: Updates) -> TreeSums:
    """sum_k w_k * delta_k as tree nodes: the pools' partial sums, or leaves from the deltas."""
    if updates.weighted_sums is not None:
        return updates.weighted_sums
    return TreeSums.leaves(updates.weights[:, None] * updates.deltas, updates.client_ids)


@stage("reduction", decomposable=True, mean_of_one=True)
def weighted_mean() -> Aggregator:
    """FedAvg's reduction (McMahan et al., 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data"): sum_k w_k * delta_k / sum_k w_k, with w_k = n_k the
    client's sample count. The sum runs over a fixed tree of client ids (engine/core/tree.py), so
    pools can pre-reduce it. With zero total weight the step is zero."""

    def reduce(updates: Updates) -> torch.Tensor:
        sums = weighted_sums(updates)
        total = updates.weights.double().sum()
        if total <= 0:
            return torch.zeros(sums.sums.shape[1], dtype=sums.sums.dtype)
        return tree.total(sums, sums.sums.shape[1]) / total.to(sums.sums.dtype)

    return stateless(reduce)


@stage("optimizer")
def server_sgd(lr: Annotated[float, Field(gt=0)] = 1.0) -> Aggregator:
    """Server SGD on the pseudo-gradient -delta (Reddi et al., 2021, "Adaptive Federated
    Optimization"): x <- x + lr * delta. lr = 1 is plain FedAvg."""
    return stateless(lambda delta: lr * delta)


@stage("aggregator", decomposable=True)
def fedavg(server_lr: Annotated[float, Field(gt=0)] = 1.0) -> Aggregator:
    """FedAvg (McMahan et al., 2017) with a server learning rate."""
    return chain(weighted_mean(), server_sgd(lr=server_lr))
