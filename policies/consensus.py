"""The consensus contract (decentralized learning): what a block of peers receives in one
gossip step, and the policies that turn it into their new models.

A pool owns a block of n peers. For one gossip step it gathers every model its peers read
(their own and their in-neighbours', M rows in all) and the mixing weights of its rows of W
(W[i, j]: the weight receiver i gives to j's model; new x_i = sum_j W[i, j] x_j). A policy
is a pure function of that `Neighbourhood`; the only per-peer state is the push-sum mass,
which travels with the models. Mixing a block row by row gives the same bits as mixing the
whole graph at once, so results do not depend on how peers are laid out over pools.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from engine.core.neighbourhood import Neighbourhood

Update = Callable[[Neighbourhood], tuple[torch.Tensor, torch.Tensor]]


class Sampling(NamedTuple):
    """A sampling protocol's parameters (MoDeST): each round the first `sample_size` online
    peers of a seeded order train; the first `aggregators` online peers of the next round's
    sample aggregate. An aggregator averages once floor(sample_size * success_fraction)
    models arrived, or `timeout_s` after the first one if at least `min_models` did (else
    the aggregation is dropped), and sends the aggregate to the next sample."""

    sample_size: int
    aggregators: int = 1
    success_fraction: float = 1.0
    timeout_s: float = 300.0
    min_models: int = 3

    @property
    def needed(self) -> int:
        return max(1, int(self.sample_size * self.success_fraction))


class Consensus(NamedTuple):
    """update(neighbourhood) -> (new models [n, P], new push-sum mass [n]), or with
    `init_state` (new models, new mass, new state [n, S]).

    `sampling`: a sampling protocol (MoDeST) trains only a sample of peers a round, and the
    engine builds each round's W from the samples and aggregations instead of the graph."""

    update: Update
    sampling: Sampling | None = None
    pairwise: bool = False  # plain pairwise averaging (asynchronous gossip runs it natively)
    # a batch of this many of each peer's own samples in `Neighbourhood.evidence` (0: none)
    evidence: int = 0
    # per-peer state: init_state(num_peers) -> the first row [S] (float64) of every peer;
    # `update` then reads `Neighbourhood.state` and returns (models, mass, new state rows)
    init_state: Callable[[int], torch.Tensor] | None = None
    # DADAO (policies/dadao.py): the asynchronous protocol runs its accelerated dynamics
    # (ODE between events, gradient and communication jumps) instead of `update`
    accelerated: Any = None
    # Bristle: only the output layer (the model's last weight and bias) is mixed, so the
    # feature layers must be frozen and shared (training.freeze_features)
    output_layer: bool = False


def consensus_policy(mean_preserving: bool, needs_column_stochastic: bool = False):
    """Mark a consensus factory. `mean_preserving`: with a doubly stochastic W and no
    forgeries, the average model is unchanged (linear averaging). `needs_column_stochastic`:
    the policy is push-sum and takes `gossip.mixing: push_sum` weights."""

    def mark(factory: Callable[..., Consensus]) -> Callable[..., Consensus]:
        factory.mean_preserving = mean_preserving
        factory.needs_column_stochastic = needs_column_stochastic
        return factory

    return mark
