"""Staleness functions s(tau) (registry STALENESS) that scale an asynchronous update computed
tau server versions ago. Each kind is a function of tau with its own parameters.

FedAsync (Xie, Koyejo & Gupta, 2019, "Asynchronous Federated Optimization", Section 5.2) mixes
x <- (1 - alpha_t) x + alpha_t x_new with alpha_t = alpha * s(tau) and proposes three families:

    constant   : s(tau) = 1
    polynomial : s(tau) = (1 + tau)^(-a)
    hinge      : s(tau) = 1 if tau <= b, else 1 / (a (tau - b) + 1)

FedBuff (Nguyen et al., 2022, "Federated Learning with Buffered Asynchronous Aggregation")
scales each buffered client update by s(tau) = 1 / sqrt(1 + tau): kind "sqrt".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np
from pydantic import Field

from engine.core.plugins import Registry

Staleness = Callable[[np.ndarray], np.ndarray]  # tau (float64, >= 0) -> s(tau)
Exponent = Annotated[float, Field(ge=0)]


def constant(tau: np.ndarray) -> np.ndarray:
    """FedAsync's constant s(tau) = 1 (Xie et al., 2019)."""
    return np.ones_like(tau)


def polynomial(tau: np.ndarray, a: Exponent = 0.5) -> np.ndarray:
    """FedAsync's polynomial s(tau) = (1 + tau)^(-a) (Xie et al., 2019)."""
    return (1.0 + tau) ** (-a)


def hinge(tau: np.ndarray, a: Exponent = 0.5, b: Exponent = 4.0) -> np.ndarray:
    """FedAsync's hinge s(tau) = 1 for tau <= b, else 1 / (a (tau - b) + 1) (Xie et al.,
    2019)."""
    return np.where(tau <= b, 1.0, 1.0 / (a * np.maximum(tau - b, 0.0) + 1.0))


def inverse_sqrt(tau: np.ndarray) -> np.ndarray:
    """FedBuff's s(tau) = 1 / sqrt(1 + tau) (Nguyen et al., 2022)."""
    return 1.0 / np.sqrt(1.0 + tau)


STALENESS: Registry[Staleness] = Registry("staleness function", {
    "constant": constant, "polynomial": polynomial, "hinge": hinge, "sqrt": inverse_sqrt,
}, runtime=("tau",))


def staleness_weight(fn: Staleness, tau: np.ndarray | int) -> np.ndarray:
    """s(tau) elementwise over tau >= 0 (float64, the shape of tau)."""
    tau = np.asarray(tau, dtype=np.float64)
    if np.any(tau < 0) or not np.all(np.isfinite(tau)):
        raise ValueError("staleness tau must be finite and >= 0")
    return fn(tau)
