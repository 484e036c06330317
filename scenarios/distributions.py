"""Distributions of a per-client quantity (devices, availability rates, crash downtimes, the
local steps anarchic clients choose), registry DISTRIBUTIONS.

A config names one like any plugin, e.g. `step_s: {kind: lognormal, median: 0.05, sigma: 1.5}`.
`draw(n, rng)` gives n float64 values from the caller's seeded generator; `low` is the smallest
value the distribution can yield (None when every value is > 0), which callers check against
their own bounds (a bandwidth must be > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, NamedTuple

import numpy as np
from pydantic import Field

from engine.core.errors import ConfigError
from engine.core.plugins import Registry

NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]


class Distribution(NamedTuple):
    draw: Callable[[int, np.random.Generator], np.ndarray]  # (n, rng) -> float64 [n]
    low: float | None  # the smallest value it can yield; None: only values > 0


def _constant(value: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.full(n, value, dtype=np.float64)


def _uniform(low: float, high: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(low, high, n)


def _lognormal(median: float, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.lognormal(np.log(median), sigma, n)


def _pareto(scale: float, shape: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return scale * (1.0 + rng.pareto(shape, n))


def _tiers(values: np.ndarray, p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(values, size=n, p=p)


def constant(value: NonNegative) -> Distribution:
    """Every client gets `value`."""
    return Distribution(partial(_constant, value), value)


def uniform(low: NonNegative, high: NonNegative) -> Distribution:
    """Uniform on [low, high]."""
    if low > high:
        raise ConfigError(f"uniform: low={low} must be <= high={high}")
    return Distribution(partial(_uniform, low, high), low)


def lognormal(median: Positive, sigma: NonNegative) -> Distribution:
    """exp(N(log median, sigma)): the median is `median`, every value > 0."""
    return Distribution(partial(_lognormal, median, sigma), None)


def pareto(scale: Positive, shape: Positive) -> Distribution:
    """Pareto type I: minimum `scale`, tail index `shape` (mean scale * shape / (shape - 1))."""
    return Distribution(partial(_pareto, scale, shape), None)


def tiers(values: Annotated[list[float], Field(min_length=1)],
          weights: Annotated[list[float], Field(min_length=1)] | None = None) -> Distribution:
    """`values` drawn with probabilities proportional to `weights` (default: equal)."""
    w = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.size != len(values):
        raise ConfigError(f"tiers: weights must have one entry per value ({len(values)})")
    if np.any(w < 0) or not w.sum() > 0:
        raise ConfigError(f"tiers: weights must be >= 0 with a positive sum (got {weights})")
    v = np.asarray(values, dtype=np.float64)
    return Distribution(partial(_tiers, v, w / w.sum()), float(v[w > 0].min()))


DISTRIBUTIONS: Registry[Distribution] = Registry("distribution", {
    "constant": constant, "uniform": uniform, "lognormal": lognormal, "pareto": pareto,
    "tiers": tiers,
})


def check_low(dist: Distribution, where: str, strictly_positive: bool) -> Distribution:
    """`dist` if it yields only values > 0 (or >= 0); else a ConfigError naming `where`."""
    low = dist.low
    if low is not None and (low <= 0 if strictly_positive else low < 0):
        bound = "> 0" if strictly_positive else ">= 0"
        raise ConfigError(f"{where}: values must be {bound}; this distribution can yield {low}")
    return dist
