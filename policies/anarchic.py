"""Anarchic Federated Averaging (Yang, Zhang, Khanduri & Liu, 2022, "Anarchic Federated
Learning", ICML 2022): clients choose when to take part and how many local steps to run
(scenarios/availability.py `anarchic`); the server averages each update per local step and
steps with a two-sided learning rate. The algorithms are written from the paper as we know
it (Algorithms 1 and 2); the stored copies searched in this session gave its abstract, not its
algorithm boxes, so the forms below were not re-checked against the text.

    aggregation: {afa_cd: {lr: 4.0}}          # or afa_cs (keeps every client's last update)
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import torch
from pydantic import Field

from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.aggregation import server_sgd, weighted_mean
from policies.base import Aggregator, chain, stateless
from policies.base import stage as mark
from policies.robust import stack


def per_step_updates(u: Updates) -> Updates:
    """Each delta divided by its client's local step count K_i, every client weighing 1: with
    local SGD at rate eta_L, delta_i / K_i = -eta_L times the average of its K_i local
    gradients (AFA's G_i, up to the factor -eta_L). A client that took no step weighs 0."""
    deltas = stack(u, "afa")
    steps = u.steps
    if steps is None:
        raise ValueError("afa needs each client's local steps; these updates carry none")
    k = steps.to(deltas.dtype).clamp(min=1.0)
    return u._replace(deltas=deltas / k[:, None], weights=(steps > 0).to(u.weights.dtype))


class Memory(NamedTuple):
    """AFA-CS's server memory: each client's last per-step update, and who has reported."""

    latest: torch.Tensor  # [N, P]
    seen: torch.Tensor  # [N] bool


def memory_mean(num_clients: int) -> Aggregator:
    """A reduction with memory: the round's reporting clients (weight > 0) replace their row;
    the output is the mean over every client that has reported so far (zeros before any)."""

    def init(params: torch.Tensor) -> Memory:
        return Memory(torch.zeros(num_clients, params.numel(), dtype=params.dtype),
                      torch.zeros(num_clients, dtype=torch.bool))

    def update(u: Updates, state: Memory) -> tuple[torch.Tensor, Memory]:
        ids = u.client_ids[u.weights > 0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_clients):
            raise ValueError(f"afa_cs: client ids must lie in [0, {num_clients})")
        latest, seen = state.latest.clone(), state.seen.clone()
        latest[ids] = u.deltas[u.weights > 0].to(latest.dtype)
        seen[ids] = True
        count = int(seen.sum())
        if count == 0:
            return torch.zeros(latest.shape[1], dtype=latest.dtype), Memory(latest, seen)
        step = latest[seen].double().sum(dim=0) / count
        return step.to(latest.dtype), Memory(latest, seen)

    return Aggregator(init, update)


Rate = Annotated[float, Field(gt=0)]


@mark("aggregator", needs=("steps",))
def afa_cd(lr: Rate = 1.0) -> Aggregator:
    """AFA-CD, Anarchic Federated Averaging for cross-device FL (Yang et al., 2022, Algorithm
    1). A worker that chooses to take part pulls the model, runs the K_i local SGD steps it
    chooses at rate eta_L and returns the average of its local stochastic gradients
    G_i = (1/K_i) sum_k g_i^k; the server averages the m updates that arrived,
    G = (1/m) sum_i G_i, and steps x <- x - eta eta_L G. Clients here send deltas
    delta_i = -eta_L sum_k g_i^k, so the server's step is
        eta * (1/m) sum_i delta_i / K_i        (`lr` = eta, the server's learning rate),
    and eta_L (training.lr) enters through the deltas. The average is uniform over the
    arrivals (sample counts are not used); stale arrivals under an asynchronous server enter
    like fresh ones, as in the paper. Departures: G_i is recovered from the delta, which is
    exact for plain local SGD and not for momentum, FedProx or SCAFFOLD's corrected steps;
    the paper's experiments tune eta, here `lr` defaults to 1 (one average local step per
    round; set it near the mean K_i for FedAvg's scale)."""
    return chain(stateless(per_step_updates), weighted_mean(), server_sgd(lr))


@mark("aggregator", needs=("steps",))
def afa_cs(lr: Rate = 1.0,
           num_clients: Annotated[int, Field(ge=1)] | None = None) -> Aggregator:
    """AFA-CS, Anarchic Federated Averaging for cross-silo FL (Yang et al., 2022, Algorithm
    2): as AFA-CD, but the server keeps every worker's most recent G_i and steps with the
    average over all workers' stored updates, x <- x - eta eta_L (1/M) sum_i G_i, reusing
    the stale G_i of workers that did not report (variance reduction over the silos). Here:
        eta * (1/M_seen) sum_{i seen} delta_i / K_i,
    over the workers that have reported at least once (`num_clients` rows of memory, filled
    by the engine from the population size). Departure: the paper sums over all M workers,
    every one of which reports before the analysis starts; before a worker's first report we
    leave it out of the mean instead of counting a zero update. Delta -> G_i as in afa_cd.
    Synchronous rounds only: asynchronous servers key updates by dispatch, not client."""
    if num_clients is None:
        raise ConfigError("afa_cs: num_clients (the population size) is required; "
                          "build_aggregator(specs, num_clients=N) sets it")
    return chain(stateless(per_step_updates), memory_mean(num_clients), server_sgd(lr))


afa_cs.synchronous_only = (
    "AFA-CS keeps each client's latest update by client id, and an asynchronous server's "
    "updates are keyed by dispatch (a client's stale and fresh updates are other rows)")
