"""Client selection policies: whom to use among the available clients."""

from __future__ import annotations

import numpy as np


def uniform(available: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K distinct clients uniformly at random among the available ones, sorted by id
    (FedAvg's client sampling, McMahan et al., 2017)."""
    k = min(k, available.size)
    return np.sort(rng.choice(available, size=k, replace=False))
