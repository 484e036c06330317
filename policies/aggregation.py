"""Server-side aggregation stages: FedAvg = chain(weighted_mean(), server_sgd(lr))."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from policies.base import Aggregator, Updates, chain, stage, stateless


@stage("reduction")
def weighted_mean() -> Aggregator:
    """FedAvg's reduction (McMahan et al., 2017, "Communication-Efficient Learning of Deep
    Networks from Decentralized Data"): sum_k w_k * delta_k / sum_k w_k, with w_k = n_k the
    client's sample count. With zero total weight the step is zero."""

    def reduce(updates: Updates) -> torch.Tensor:
        w = updates.weights.to(updates.deltas.dtype)
        total = w.sum()
        if total <= 0:
            return torch.zeros(updates.deltas.shape[1], dtype=updates.deltas.dtype)
        return (w @ updates.deltas) / total

    return stateless(reduce)


@stage("optimizer")
def server_sgd(lr: Annotated[float, Field(gt=0)] = 1.0) -> Aggregator:
    """Server SGD on the pseudo-gradient -delta (Reddi et al., 2021, "Adaptive Federated
    Optimization"): x <- x + lr * delta. lr = 1 is plain FedAvg."""
    return stateless(lambda delta: lr * delta)


@stage("aggregator")
def fedavg(server_lr: Annotated[float, Field(gt=0)] = 1.0) -> Aggregator:
    """FedAvg (McMahan et al., 2017) with a server learning rate."""
    return chain(weighted_mean(), server_sgd(lr=server_lr))
