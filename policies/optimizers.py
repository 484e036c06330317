"""Server optimizers: stages that turn the reduced update delta [P] into the global step [P].

The server treats -delta as a pseudo-gradient (Reddi et al., 2021). Two rules cover the
literature, each implemented once and shared by the named variants:

- `_momentum`: heavy-ball or Nesterov momentum (FedAvgM; DiLoCo's outer optimizer);
- `_adaptive`: a first moment and a per-coordinate second moment whose update is the only
  difference between FedAdagrad, FedAdam and FedYogi.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import Field

from policies.aggregation import weighted_mean
from policies.base import Aggregator, chain, stage

Positive = Annotated[float, Field(gt=0)]
Beta = Annotated[float, Field(ge=0, lt=1)]


def _momentum(lr: float, momentum: float, nesterov: bool) -> Aggregator:
    """buf <- momentum * buf + delta; step = lr * buf, or lr * (delta + momentum * buf) with
    Nesterov. This is torch.optim.SGD (dampening 0) on the pseudo-gradient -delta."""

    def init(params: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.zeros_like(params),)

    def update(delta: torch.Tensor, state: tuple[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        buf = momentum * state[0] + delta
        step = lr * (delta + momentum * buf) if nesterov else lr * buf
        return step, (buf,)

    return Aggregator(init, update)


@stage("optimizer")
def server_momentum(lr: Positive = 1.0, momentum: Beta = 0.9, nesterov: bool = False
                    ) -> Aggregator:
    """Server momentum, FedAvgM (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification"): v <- momentum * v + delta;
    x <- x + lr * v."""
    return _momentum(lr, momentum, nesterov)


@stage("optimizer")
def diloco_outer(lr: Positive = 0.7, momentum: Beta = 0.9) -> Aggregator:
    """DiLoCo's outer optimizer (Douillard et al., 2023, "DiLoCo: Distributed Low-Communication
    Training of Language Models"): Nesterov momentum on the outer gradient -delta, with the
    paper's lr 0.7 and momentum 0.9."""
    return _momentum(lr, momentum, nesterov=True)


SecondMoment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (v, delta^2) -> v


def _adaptive(lr: float, beta1: float, tau: float, second_moment: SecondMoment,
              bias_correction: tuple[float, float] | None = None) -> Aggregator:
    """Algorithm 2 of Reddi et al. (2021): m <- b1 m + (1 - b1) delta; v <- rule(v, delta^2);
    x <- x + lr * m / (sqrt(v) + tau), with v starting at tau^2. `bias_correction=(b1, b2)`
    divides m and v by (1 - b^t) as Adam (Kingma & Ba) does; the paper does not."""

    def init(params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        v0 = torch.full_like(params, tau**2 if bias_correction is None else 0.0)
        return torch.zeros_like(params), v0, torch.zeros((), dtype=torch.int64)

    def update(delta: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        m, v, t = state
        t = t + 1
        m = beta1 * m + (1 - beta1) * delta
        v = second_moment(v, delta * delta)
        m_hat, v_hat = m, v
        if bias_correction is not None:
            b1, b2 = bias_correction
            m_hat, v_hat = m / (1 - b1 ** int(t)), v / (1 - b2 ** int(t))
        return lr * m_hat / (v_hat.sqrt() + tau), (m, v, t)

    return Aggregator(init, update)


@stage("optimizer")
def server_adagrad(lr: Positive = 0.1, beta1: Beta = 0.0, tau: Positive = 1e-3
                   ) -> Aggregator:
    """FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization"): v <- v + delta^2."""
    return _adaptive(lr, beta1, tau, lambda v, d2: v + d2)


@stage("optimizer")
def server_adam(lr: Positive = 0.01, beta1: Beta = 0.9, beta2: Beta = 0.99,
                tau: Positive = 1e-3, bias_correction: bool = False) -> Aggregator:
    """FedAdam (Reddi et al., 2021, "Adaptive Federated Optimization"):
    v <- b2 v + (1 - b2) delta^2. `bias_correction=True` gives Adam exactly as
    torch.optim.Adam computes it (eps = tau)."""
    return _adaptive(lr, beta1, tau, lambda v, d2: beta2 * v + (1 - beta2) * d2,
                     (beta1, beta2) if bias_correction else None)


@stage("optimizer")
def server_yogi(lr: Positive = 0.01, beta1: Beta = 0.9, beta2: Beta = 0.99,
                tau: Positive = 1e-3) -> Aggregator:
    """FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization"; Yogi: Zaheer et al.,
    2018): v <- v - (1 - b2) delta^2 sign(v - delta^2)."""
    return _adaptive(lr, beta1, tau, lambda v, d2: v - (1 - beta2) * d2 * torch.sign(v - d2))


@stage("aggregator", decomposable=True)
def fedadam(server_lr: Positive = 0.01, beta1: Beta = 0.9, beta2: Beta = 0.99,
            tau: Positive = 1e-3) -> Aggregator:
    """FedAdam (Reddi et al., 2021): chain(weighted_mean(), server_adam(...))."""
    return chain(weighted_mean(), server_adam(server_lr, beta1, beta2, tau))


@stage("aggregator", decomposable=True)
def fedavgm(server_lr: Positive = 1.0, momentum: Beta = 0.9) -> Aggregator:
    """FedAvgM (Hsu et al., 2019): chain(weighted_mean(), server_momentum(...))."""
    return chain(weighted_mean(), server_momentum(server_lr, momentum))
