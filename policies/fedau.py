"""FedAU: FedAvg with aggregation weights adapted online to unknown participation statistics.

Wang & Ji, 2024, "A Lightweight Method for Tackling Unknown Participation Statistics in
Federated Averaging" (ICLR 2024; reference code github.com/IBM/fedau, `-weighting adaptive`).

The server update is x <- x + gamma * (1/N) * sum_{n participating in round t} omega_n^t Delta_n^t
(1/N over the whole population N, not over the participants). omega_n^t estimates 1/p_n as the
mean of client n's participation intervals observed *before* round t, with a cutoff K:

    every round:  S_n += 1
                  if n participates or S_n == K: record the interval S_n; S_n = 0
    omega_n^t = mean of the intervals recorded in rounds < t, or 1 while none is recorded.

Only intervals recorded before round t count, so omega_n^t does not depend on whether n takes
part in round t: the reference code computes the weight before appending the interval that ends
in the current round, and the reference code weights all N clients' terms by 1/N (absent ones
add zero).

The stage only sees participants, so the per-round counting above is evaluated lazily: with g
rounds since the client's last participation (its virtual last participation is round -1), the
rounds in between closed floor((g - 1) / K) cutoff intervals of length K, all recorded before
round t, and round t closes the last interval of length g - K * floor((g - 1) / K) in [1, K].
Together they sum to g. A gap of exactly K is therefore one interval of K, not two.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import torch
from pydantic import Field

from engine.core import tree
from engine.core.errors import ConfigError
from engine.core.tree import TreeSums
from engine.core.updates import Updates
from policies.base import Aggregator, stage


class FedAUState(NamedTuple):
    """Per client [N] int64 arrays, counted lazily: intervals recorded up to and including the
    client's last participation (cutoff intervals since then are derived from `round`)."""

    round: torch.Tensor  # int64 []: the index of the next aggregation round
    last: torch.Tensor  # [N] last participation round; -1 before the first
    count: torch.Tensor  # [N] number of intervals recorded
    total: torch.Tensor  # [N] sum of their lengths
    num_params: torch.Tensor  # int64 []: P, for the zero step of a round without updates


def init_state(num_clients: int, num_params: int) -> FedAUState:
    return FedAUState(torch.zeros((), dtype=torch.int64),
                      torch.full((num_clients,), -1, dtype=torch.int64),
                      torch.zeros(num_clients, dtype=torch.int64),
                      torch.zeros(num_clients, dtype=torch.int64),
                      torch.tensor(num_params, dtype=torch.int64))


def interval_weights(state: FedAUState, cutoff: int,
                     client_ids: torch.Tensor | None = None) -> torch.Tensor:
    """omega (float64, one per id) that clients `client_ids` (default: all) get if they take
    part in the state's current round: the mean of their intervals so far, cutoff ones included."""
    t, last, count, total, _ = state
    ids = torch.arange(last.numel()) if client_ids is None else client_ids
    chunks = (t - last[ids] - 1) // cutoff  # cutoff intervals closed since the last participation
    n = count[ids] + chunks
    length = total[ids] + chunks * cutoff
    return torch.where(n > 0, length.double() / n.clamp(min=1).double(), 1.0)


def record_participation(state: FedAUState, cutoff: int, client_ids: torch.Tensor
                         ) -> FedAUState:
    """Clients `client_ids` participate in round t: record their pending cutoff intervals and
    the interval ending now (lengths summing to the gap g = t - last); go to round t + 1."""
    t, last, count, total, num_params = state
    gap = t - last[client_ids]
    last, count, total = last.clone(), count.clone(), total.clone()
    last[client_ids] = t
    count[client_ids] += (gap - 1) // cutoff + 1
    total[client_ids] += gap
    return FedAUState(t + 1, last, count, total, num_params)


def _check_ids(ids: torch.Tensor, num_clients: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_clients):
        raise ValueError(f"fedau: client ids must lie in [0, {num_clients}) (the population); "
                         f"got {int(ids.min())}..{int(ids.max())}")
    if ids.unique().numel() != ids.numel():
        raise ValueError("fedau: a client appears twice in one round")


@stage("aggregator", decomposable=False)
def fedau(cutoff: Annotated[int, Field(ge=1)] = 50,
          server_lr: Annotated[float, Field(gt=0)] = 1.0,
          num_clients: Annotated[int, Field(ge=1)] | None = None) -> Aggregator:
    """FedAU (Wang & Ji, 2024, "A Lightweight Method for Tackling Unknown Participation
    Statistics in Federated Averaging", ICLR 2024): x <- x + server_lr * (1/N) *
    sum_k omega_k delta_k, with omega_n the online mean of client n's participation intervals
    (cutoff K = `cutoff`; 1 before its first interval). Sample counts are not used: the paper's
    objective is the plain mean of the N clients' objectives. Needs every delta (not
    decomposable); `num_clients` (N) is set from the population by build_aggregator."""
    if num_clients is None:
        raise ConfigError("fedau: num_clients (the population size) is required; "
                          "build_aggregator(specs, num_clients=N) sets it")
    n_pop, k = num_clients, cutoff

    def init(params: torch.Tensor) -> FedAUState:
        return init_state(n_pop, params.numel())

    def update(updates: Updates, state: FedAUState) -> tuple[torch.Tensor, FedAUState]:
        ids = updates.client_ids
        if ids.numel() == 0:  # nobody reported: the round still counts for every interval
            return torch.zeros(int(state.num_params)), record_participation(state, k, ids)
        if updates.deltas is None:
            raise ValueError("fedau needs every client's delta; pools must not pre-reduce")
        _check_ids(ids, n_pop)
        omega = interval_weights(state, k, ids)
        width = updates.deltas.shape[1]
        scaled = omega.to(updates.deltas.dtype)[:, None] * updates.deltas
        step = tree.total(TreeSums.leaves(scaled, ids), width) * (server_lr / n_pop)
        return step, record_participation(state, k, ids)

    return Aggregator(init, update)


fedau.synchronous_only = (
    "FedAU estimates each client's participation interval over synchronous rounds; an "
    "asynchronous server has no rounds to count")
