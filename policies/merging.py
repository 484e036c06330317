"""Model merging at the server: the round's client models w_k = w0 + delta_k (w0 the global
model) merged into the next global model, per layer (Model Stock) or by held-out accuracy
(model soups).

    aggregation: model_stock                       # layer sizes filled by the engine
    aggregation: greedy_soup                       # with task.validation_fraction: 0.1
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.aggregation import weighted_mean
from policies.base import Aggregator, State, chain, stage, stateless
from policies.robust import stack
from policies.weighting import uniform_weights


def layer_spans(layers: tuple[int, ...] | None, size: int, rule: str) -> list[tuple[int, int]]:
    """(start, stop) of each layer (parameter tensor) in the flat vector; None: one layer."""
    sizes = layers or (size,)
    if sum(sizes) != size:
        raise ConfigError(f"aggregation.{rule}: layers of {sum(sizes)} parameters in all do "
                          f"not match the model's {size}")
    stops = np.cumsum(sizes).tolist()
    return list(zip([0, *stops[:-1]], stops, strict=True))


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """The mean over pairs i < j of cos(x_i, x_j) for the rows of x [K, n] (float64); a zero
    row has cosine 0 with every other. 1 for a single row (no pair)."""
    k = x.shape[0]
    if k < 2:
        return torch.ones((), dtype=x.dtype)
    norms = torch.linalg.vector_norm(x, dim=1)
    unit = torch.where(norms[:, None] > 0, x / norms.clamp(min=1e-300)[:, None], 0.0)
    gram = unit @ unit.T
    return (gram.sum() - gram.diagonal().sum()) / (k * (k - 1))


def stock_ratio(cos: torch.Tensor, k: int) -> torch.Tensor:
    """Model Stock's interpolation ratio t = k cos / (1 + (k - 1) cos), with cos clamped to
    [0, 1] (t = 0 keeps w0, t = 1 takes the average)."""
    cos = cos.clamp(0.0, 1.0)
    return k * cos / (1 + (k - 1) * cos)


@stage("reduction", mean_of_one=True)
def model_stock(layer_sizes: tuple[int, ...] | None = None) -> Aggregator:
    """Model Stock (Jang, Yun & Han, 2024, "Model Stock: All we need is just a few fine-tuned
    models", ECCV 2024), with the global model w0 as the pre-trained anchor and the round's K
    client models w_k = w0 + delta_k as the fine-tuned ones. Per layer, the merged weights are
        w_H = t w_avg + (1 - t) w0,    t = K cos(theta) / (1 + (K - 1) cos(theta)),
    with w_avg the plain (unweighted) average of the K models and cos(theta) the mean over
    pairs of the cosine between their deltas; the step is w_H - w0 = t mean_k(delta_k).

    Layers are the model's parameter tensors (each weight and bias), whose sizes the engine
    fills in `layer_sizes` (`ModelSpec.layer_sizes`); left None (a stage built outside a run)
    the whole vector is one layer. Departures: the paper derives t for models at equal angles
    and assumes cos(theta) > 0; here cos(theta) is the mean pairwise cosine (the paper's
    experiments merge K = 2, where it is the one angle) and is clamped at 0, so a layer whose
    deltas point away from one another keeps w0 instead of extrapolating; a zero delta has
    cosine 0 with the others. On one update t = 1 (the update itself). Client weights (sample
    counts) are not used: the paper averages the models uniformly."""

    def reduce(u: Updates) -> torch.Tensor:
        raw = stack(u, "model_stock")
        deltas = raw.double()
        k = deltas.shape[0]
        mean = deltas.mean(dim=0)
        step = torch.empty_like(mean)
        for a, b in layer_spans(layer_sizes, deltas.shape[1], "model_stock"):
            t = stock_ratio(mean_pairwise_cosine(deltas[:, a:b]), k)
            step[a:b] = t * mean[a:b]
        return step.to(raw.dtype)

    return stateless(reduce)


@stage("aggregator", decomposable=False)
def uniform_soup() -> Aggregator:
    """The uniform soup (Wortsman et al., 2022, "Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time", ICML 2022): the
    plain average of the round's client models, w = (1/K) sum_k w_k, i.e. the step
    (1/K) sum_k delta_k: `[uniform_weights, weighted_mean]` (sample counts are not used)."""
    return chain(uniform_weights(), weighted_mean())


def greedy_members(deltas: torch.Tensor, base: torch.Tensor, ids: torch.Tensor,
                   score: Callable[[torch.Tensor], float]) -> list[int]:
    """Rows of `deltas` in the greedy soup: models base + delta_k sorted by held-out score
    (descending; ties to the lower client id), each added when the soup's score with it is
    at least the soup's score without it. The first (best) model always starts the soup."""
    scores = [score(base + d) for d in deltas]
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], int(ids[k])))
    members = order[:1]
    best = scores[order[0]]
    for k in order[1:]:
        trial = members + [k]
        value = score(base + deltas[trial].double().mean(dim=0).to(base.dtype))
        if value >= best:
            members, best = trial, value
    return members


@stage("reduction", needs=("validation",), mean_of_one=True)
def greedy_soup(validation: Any = None) -> Aggregator:
    """The greedy soup (Wortsman et al., 2022, "Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time", ICML 2022,
    Recipe 1): sort the K client models w_k = w0 + delta_k by held-out validation accuracy,
    descending; start the soup with the best and add each next model if the soup's held-out
    accuracy with it does not drop (>=); the new global model is the soup's plain average.

    Held-out data: the server's validation split of the task (`task.validation_fraction`, a
    share of the training samples that no client trains on); the engine fills `validation`
    with a model's accuracy on it (engine/compute/evaluation.py ValidationAccuracy). The
    stage keeps the global model w0 in its state (the step it returns is what the engine
    adds), so it is the chain's last stage and needs synchronous rounds (an asynchronous
    server scales the step). Departures: the paper soups fine-tuned models of one
    pre-trained model once; here every round soups the clients' models from the current
    global model. Ties in accuracy go to the lower client id. Client weights are not used."""
    if validation is None:
        raise ConfigError("aggregation: greedy_soup scores client models on held-out data; "
                          "set task.validation_fraction (the engine then fills its scorer)")

    def init(params: torch.Tensor) -> State:
        return params.clone()

    def update(u: Updates, base: State) -> tuple[torch.Tensor, State]:
        deltas = stack(u, "greedy_soup")
        members = greedy_members(deltas, base, u.client_ids, validation)
        step = deltas[members].double().mean(dim=0).to(deltas.dtype)
        return step, base + step

    return Aggregator(init, update)


greedy_soup.sets_global_model = True  # build_aggregator: no optimizer may rescale its step
greedy_soup.synchronous_only = (
    "greedy_soup keeps the global model in its state, and an asynchronous server scales "
    "each step (or mixes it in), so the state would drift from the model it scores")
