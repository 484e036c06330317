"""How much each client counts: weighting transforms (Updates -> Updates with new `weights`,
chained before a reduction such as weighted_mean) and Fisher merging, a reduction whose weights
are per coordinate.

    aggregation: [feddisco, weighted_mean]            # or [{mwa: {penalty: 0.7}}, fedavg]
    aggregation: fisher_merge                          # pools then return diagonal Fishers
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from engine.core.updates import Updates
from policies.base import Aggregator, stage, stateless
from policies.robust import stack


def _column(u: Updates, name: str, rule: str) -> torch.Tensor:
    column = getattr(u, name)
    if column is None:
        raise ValueError(f"{rule} needs each client's {name}; these updates carry none")
    return column


@stage("transform", mean_of_one=True)
def uniform_weights() -> Aggregator:
    """Every client counts the same, whatever its data size: the unweighted average of client
    models used when sizes are unknown or not to be trusted (e.g. Li et al., 2020, "On the
    Convergence of FedAvg on Non-IID Data", scheme with equal weights)."""
    return stateless(lambda u: u._replace(weights=torch.ones_like(u.weights)))


@stage("transform", mean_of_one=True)
def sample_weights() -> Aggregator:
    """Weights n_k, the client's number of training samples (McMahan et al., 2017,
    "Communication-Efficient Learning of Deep Networks from Decentralized Data"). Pools already
    send these; the stage restores them after a transform that changed them."""
    return stateless(lambda u: u._replace(weights=u.num_samples.to(u.weights.dtype)))


def label_discrepancy(label_counts: torch.Tensor,
                      measure: Literal["kl", "l1", "l2"] = "kl") -> torch.Tensor:
    """d_k between client k's label distribution D_k and the uniform target T = 1/C:
    KL(D_k || T) (0 log 0 = 0), ||D_k - T||_1 or ||D_k - T||_2. A client with no labels: 0."""
    counts = label_counts.double()
    dist = counts / counts.sum(dim=1, keepdim=True).clamp(min=1.0)
    target = torch.full_like(dist, 1.0 / dist.shape[1])
    if measure == "kl":
        return torch.where(dist > 0, dist * torch.log(dist / target), 0.0).sum(dim=1)
    return torch.linalg.vector_norm(dist - target, ord=1 if measure == "l1" else 2, dim=1)


@stage("transform", needs=("label_counts",), mean_of_one=True)
def feddisco(a: Annotated[float, Field(ge=0)] = 0.5, b: float = 0.1,
             measure: Literal["kl", "l1", "l2"] = "kl") -> Aggregator:
    """FedDisco (Ye et al., 2023, "FedDisco: Federated Learning with Discrepancy-Aware
    Collaboration"; defaults and normalisation as in the authors' code,
    github.com/MediaBrain-SJTU/FedDisco): over the round's clients,
        p_k = ReLU(n_k - a d_k + b) / sum_m ReLU(n_m - a d_m + b),
    with n_k the client's share of the round's samples and d_k the discrepancy between its
    label distribution (sent with its update) and the uniform one; with the default KL the
    d_k are divided by their sum over the round. If every p_k would be 0, the weights fall back
    to the sample shares n_k."""

    def reweight(u: Updates) -> Updates:
        d = label_discrepancy(_column(u, "label_counts", "feddisco"), measure)
        if measure == "kl":
            d = d / d.sum() if d.sum() > 0 else torch.zeros_like(d)
        n = u.num_samples.double()
        n = n / n.sum().clamp(min=1.0)
        p = torch.relu(n - a * d + b)
        p = p / p.sum() if p.sum() > 0 else n
        return u._replace(weights=p.to(u.weights.dtype))

    return stateless(reweight)


@stage("transform", needs=("losses", "steps"), mean_of_one=True)
def mwa(metric: Literal["loss", "steps"] = "loss",
        penalty: Annotated[float, Field(ge=0)] = 0.5) -> Aggregator:
    """Metrics-Weighted Averaging (Yu & Choi, 2025, "Parameter-Efficient Checkpoint Merging via
    Metrics-Weighted Averaging"), with the clients' models as the checkpoints: weights from a
    metric with one penalty factor p, lower training loss or more training steps counting more,
        loss:  w_k = (1 / L_k)^p / sum_m (1 / L_m)^p,    steps: w_k = s_k^p / sum_m s_m^p.
    p = 0 is the uniform average; the paper's runs used p in 0.5-0.8 for loss, 1 for steps.
    Not confirmed against the paper's text: a search of the stored copies of arXiv 2504.18580
    (abstract pages, summaries; no full text or code was found) gives only the abstract's
    description, "a formula with a penalty factor to adjust weight distribution, requiring only
    one hyperparameter regardless of the number of checkpoints", which the power form
    satisfies (one p for any K; p = 0 uniform, larger p sharper); the exact form is still our
    reading. A client that took no step gets 0."""

    def reweight(u: Updates) -> Updates:
        steps = _column(u, "steps", "mwa").double()
        if metric == "loss":
            score = torch.where(steps > 0, u.losses.double().clamp(min=1e-12) ** -penalty, 0.0)
        else:
            score = steps**penalty * (steps > 0)
        total = score.sum()
        w = score / total if total > 0 else torch.full_like(score, 1.0 / max(score.numel(), 1))
        return u._replace(weights=w.to(u.weights.dtype))

    return stateless(reweight)


@stage("reduction", needs=("fisher",), mean_of_one=True)
def fisher_merge(floor: Annotated[float, Field(gt=0)] = 1e-6,
                 normalize: bool = True) -> Aggregator:
    """Fisher merging (Matena & Raffel, 2022, "Merging Models with Fisher-Weighted Averaging";
    defaults of their code, github.com/mmatena/model_merging): per coordinate j,
        theta_j = sum_k c_k F_kj theta_kj / sum_k c_k F_kj,
    with F_k client k's diagonal Fisher (floored at `floor`) at its local model, and c_k its
    weight (default: samples), divided by ||F_k||_2 when `normalize`. As theta_k = x + delta_k,
    the step is sum_k c_k F_kj delta_kj / sum_k c_k F_kj. Pools compute F_k when the chain has
    this stage (engine/compute/training.py, DiagonalFisher)."""

    def reduce(u: Updates) -> torch.Tensor:
        raw = stack(u, "fisher_merge")
        deltas = raw.double()
        fisher = _column(u, "fisher", "fisher_merge").double()
        c = u.weights.double()
        if normalize:
            norm = torch.linalg.vector_norm(fisher, dim=1)
            c = torch.where(norm > 0, c / norm.clamp(min=1e-300), 0.0)
        coef = c[:, None] * fisher.clamp(min=floor)
        total = coef.sum(dim=0)
        step = torch.where(total > 0, (coef * deltas).sum(dim=0) / total.clamp(min=1e-300), 0.0)
        return step.to(raw.dtype)

    return stateless(reduce)


