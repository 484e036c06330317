"""Consensus policies for decentralized learning (see policies/consensus.py for the contract)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from engine.core.neighbourhood import Neighbourhood
from policies.consensus import Consensus, Sampling, consensus_policy


@consensus_policy(mean_preserving=True)
def gossip() -> Consensus:
    """Gossip averaging, x_i <- sum_j W_ij x_j (Xiao & Boyd, 2004, "Fast linear iterations for
    distributed averaging"; with local SGD steps in between this is D-PSGD: Lian et al., 2017,
    "Can Decentralized Algorithms Outperform Centralized Algorithms?"). Asynchronous
    (gossip.mode=async): randomized pairwise gossip (Boyd et al., 2006, "Randomized Gossip
    Algorithms"), an exchange per edge clock in which both ends take their mean; under a
    forging attack, pull wake-ups as the other policies."""

    def update(nb: Neighbourhood):
        return nb.mix(), nb.mass[nb.own]

    return Consensus(update, pairwise=True)


@consensus_policy(mean_preserving=True, needs_column_stochastic=True)
def push_sum() -> Consensus:
    """Push-sum (Kempe et al., 2003, "Gossip-based computation of aggregate information"), as in
    Stochastic Gradient Push (Assran et al., 2019): with column-stochastic weights, mix the
    numerators x and the masses w alike; a peer's model is the de-biased x / w, which converges
    to the average on directed graphs. Local training steps act on x, at the point x / w.
    Asynchronous: push wake-ups, as in asynchronous push-sum (Kempe et al.'s protocol run
    on one clock per peer; Assran & Rabbat, 2021, "Asynchronous Gradient Push"): a woken peer
    keeps its W_jj share of x and w and adds the W_ij shares to each out-neighbour's."""

    def update(nb: Neighbourhood):
        return nb.mix(), nb.mix_mass()

    return Consensus(update)


def _layer_variances(x: torch.Tensor, layers) -> torch.Tensor:
    """[n, L]: the unbiased variance of each row's entries within each layer."""
    return torch.stack([x[:, a:b].var(dim=1) for a, b in layers], dim=1)


@consensus_policy(mean_preserving=False)
def variance_corrected(eps: Annotated[float, Field(ge=0)] = 1e-4) -> Consensus:
    """Variance-corrected model averaging (Tian et al., 2024, "Vanishing Variance Problem in
    Fully Decentralized Neural-Network Systems"): averaging uncorrelated models shrinks each
    layer's variance below what the (Xavier) initialisation set. After mixing, every layer
    (tensors with more than one entry) is rescaled about its mean so that its variance is the
    W-weighted mean of the received models' variances for that layer ("follow others"):
    a <- (a - mean(a)) * sqrt((target + eps) / (var(a) + eps)) + mean(a).
    Asynchronous: pull wake-ups; a woken peer mixes its live in-neighbours' models with its
    row of W and corrects its layers' variances as above."""

    def update(nb: Neighbourhood):
        mixed = nb.mix()
        layers = [(a, b) for a, b in nb.layers if b - a > 1]
        if not layers:
            return mixed, nb.mass[nb.own]
        others = nb.weights * (nb.valid & (nb.index != nb.own[:, None]))
        target = nb.weighted_sum(lambda k: _layer_variances(nb.received(k), layers), others)
        total = others.sum(dim=1, keepdim=True)
        current = _layer_variances(mixed, layers)
        scale = torch.where(total > 0, ((target / total.clamp_min(1e-30) + eps)
                                        / (current + eps)).sqrt(), 1.0)
        for j, (a, b) in enumerate(layers):
            block = mixed[:, a:b]
            mu = block.mean(dim=1, keepdim=True)
            mixed[:, a:b] = (block - mu) * scale[:, j, None] + mu
        return mixed, nb.mass[nb.own]

    return Consensus(update)


def _self_centred_tau(dist2: torch.Tensor, weights: torch.Tensor, delta: float) -> torch.Tensor:
    """He et al.'s practical radius: over the nearest slots (own model first) whose weights
    add up to at most 1 - delta, tau_i^2 = sum w_ij ||x_j - x_i||^2 / delta."""
    order = torch.argsort(dist2, dim=1, stable=True)
    w = torch.gather(weights.double(), 1, order)
    d = torch.gather(dist2, 1, order).nan_to_num(posinf=0.0)
    keep = torch.cumsum(w, dim=1) <= 1.0 - delta + 1e-6  # float32 weights: 1e-7 off
    return ((w * d * keep).sum(dim=1) / delta).sqrt()


@consensus_policy(mean_preserving=False)
def clipped_gossip(tau: Annotated[float, Field(gt=0)] | None = None,
                   delta: Annotated[float, Field(gt=0, lt=1)] = 0.1) -> Consensus:
    """ClippedGossip / self-centred clipping (He, Karimireddy & Jaggi, 2022, "Byzantine-Robust
    Decentralized Learning via ClippedGossip"): x_i <- x_i + sum_j W_ij CLIP(x_j - x_i, tau_i),
    CLIP(v, t) = v min(1, t / ||v||). A fixed `tau`, or (default) the paper's adaptive radius
    for an assumed Byzantine weight `delta` per peer (see _self_centred_tau). Asynchronous:
    pull wake-ups; a woken peer clips its live in-neighbours' differences around its own
    model with its row of W."""

    def update(nb: Neighbourhood):
        own = nb.own_models()
        dist2 = nb.squared_distances()
        radius = (torch.full((nb.num_peers,), tau, dtype=torch.float64) if tau is not None
                  else _self_centred_tau(dist2, nb.weights, delta))
        factor = (radius[:, None] / dist2.sqrt().clamp_min(1e-30)).clamp(max=1.0).float()

        def clipped(k: int) -> torch.Tensor:
            return (nb.received(k) - own) * factor[:, k, None]

        return own + nb.weighted_sum(clipped), nb.mass[nb.own]

    return Consensus(update)


@consensus_policy(mean_preserving=False)
def monna(f: Annotated[int, Field(ge=0)] = 1) -> Consensus:
    """Nearest-neighbour averaging, the mixing step of MoNNA (Farhadkhani et al., 2023, "Robust
    Collaborative Learning with Linear Gradient Overhead"): of its own model and the models it
    received, a peer drops the f farthest from its own and takes the plain mean of the rest.
    MoNNA is this step with local Polyak momentum, `training.momentum` (the paper: 0.99),
    which peers keep across rounds. Asynchronous: pull wake-ups; a woken peer filters its
    live in-neighbours' models and its own this way (the paper's synchronous step, applied
    by one peer at a time)."""

    def update(nb: Neighbourhood):
        dist2 = nb.squared_distances()
        order = torch.argsort(dist2, dim=1, stable=True)
        kept = (nb.valid.sum(dim=1, keepdim=True) - f).clamp(min=1)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1])
                                                .expand_as(order).contiguous())
        uniform = (rank < kept).float() / kept.float()
        return nb.weighted_sum(nb.received, uniform), nb.mass[nb.own]

    return Consensus(update)


@consensus_policy(mean_preserving=True)
def modest(sample_size: Annotated[int, Field(ge=1)] = 10,
           aggregators: Annotated[int, Field(ge=1)] = 1,
           success_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0,
           timeout_s: Annotated[float, Field(gt=0)] = 300.0,
           min_models: Annotated[int, Field(ge=1)] = 3) -> Consensus:
    """MoDeST decentralized sampling (de Vos et al., 2023, "MoDeST: Bridging the Gap between
    Federated and Decentralized Learning with Decentralized Sampling"; the reference code,
    devos50/decentralized-learning, fixes what the abstract leaves open). Every round r has a
    seeded order of the peers; its sample S_r is the first `sample_size` online peers in that
    order. The peers of S_r that received the last aggregate train from it and send their
    models to the `aggregators` first peers of S_{r+1}. An aggregator takes the uniform mean
    once floor(sample_size * success_fraction) models arrived, or `timeout_s` (virtual time)
    after the first one if at least `min_models` arrived; otherwise it drops the round. The
    first aggregate to reach S_{r+1} is the round's model (the one evaluated), and S_{r+1}
    trains from it. Peers that join, leave, crash or lose messages are simply not in a
    sample, or their model does not arrive (engine/loops/world.py, SampledWorld)."""
    if aggregators > sample_size:
        raise ValueError(f"aggregators: the aggregators are members of the next sample; at "
                         f"most sample_size={sample_size} (got {aggregators})")
    sampling = Sampling(sample_size, aggregators, success_fraction, timeout_s, min_models)
    return Consensus(gossip().update, sampling=sampling)
