"""Model merging at the server: the round's client models w_k = w0 + delta_k (w0 the global
model) merged into the next global model, per layer (Model Stock) or by held-out accuracy
(model soups).

    aggregation: model_stock                       # layer sizes filled by the engine
"""

from __future__ import annotations

import numpy as np
import torch

from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.base import Aggregator, stage, stateless
from policies.robust import stack


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
