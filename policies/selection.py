"""Client selection policies (registry SELECTION): whom to use among the available clients.

A policy is a factory of its parameters returning a `Selection`: `choose(available, k, losses,
rng)` picks sorted client ids (`losses[i]`: client i's last reported training loss, +inf if it
never reported), and `closes_at_k` says the round closes at the K-th report (over-selection).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, NamedTuple

import numpy as np
from pydantic import Field

from engine.core.plugins import Registry

Choose = Callable[[np.ndarray, int, np.ndarray, np.random.Generator], np.ndarray]


class Selection(NamedTuple):
    choose: Choose
    closes_at_k: bool = False  # the round keeps the first K to report, and closes then


def uniform_choice(available: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct clients uniformly at random among the available ones, sorted by id."""
    k = min(k, available.size)
    return np.sort(rng.choice(available, size=k, replace=False))


def _uniform(available, k, losses, rng) -> np.ndarray:
    return uniform_choice(available, k, rng)


def _over(factor: float, available, k, losses, rng) -> np.ndarray:
    return uniform_choice(available, int(np.ceil(factor * k)), rng)


def _power(candidates: int | None, available, k, losses, rng) -> np.ndarray:
    d = candidates or 2 * k
    pool = uniform_choice(available, max(k, d), rng)
    order = np.lexsort((pool, -losses[pool]))
    return np.sort(pool[order[:k]])


def uniform() -> Selection:
    """K of the online clients uniformly at random, sorted by id (FedAvg's client sampling,
    McMahan et al., 2017)."""
    return Selection(_uniform)


def over_selection(factor: Annotated[float, Field(ge=1)] = 1.3) -> Selection:
    """ceil(factor * K) clients uniformly at random; the round keeps the first K to report
    (over-selection against stragglers, Bonawitz et al., 2019, "Towards Federated Learning at
    Scale: System Design", which selects 130% of the target)."""
    return Selection(partial(_over, factor), closes_at_k=True)


def power_of_choice(candidates: Annotated[int, Field(ge=1)] | None = None) -> Selection:
    """Power-of-choice (Cho, Wang & Joshi, 2022, "Towards Understanding Biased Client Selection
    in Federated Learning"): sample d >= K candidates uniformly (d = `candidates`, default 2K),
    keep the K with the highest last reported loss (+inf if never reported, so new clients are
    tried first: the computation-efficient cpow-d variant, which uses stale losses instead of
    polling the candidates); ties go to the lower id."""
    return Selection(partial(_power, candidates))


SELECTION: Registry[Selection] = Registry("selection policy", {
    "uniform": uniform, "over_selection": over_selection, "power_of_choice": power_of_choice,
})
