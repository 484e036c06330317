"""The population model: who is available in a round.

In this version every client is always available; participation is uniform K of N
(policies/selection.py). Availability models (heterogeneous, cyclic, Markov, traces) plug in here.
"""

from __future__ import annotations

import numpy as np

from engine.config import PopulationConfig


def clients_per_round(cfg: PopulationConfig) -> int:
    """K: the configured count, or max(1, round(fraction * N))."""
    part = cfg.participation
    if part.clients_per_round is not None:
        return part.clients_per_round
    return max(1, int(round(part.fraction * cfg.num_clients)))


def available(num_clients: int, round_idx: int) -> np.ndarray:
    """Ids of the clients available in `round_idx` (all of them, for now)."""
    return np.arange(num_clients, dtype=np.int64)
