"""The population's size per round: K of N. Who is online is scenarios/availability.py;
whom the server picks among them is policies/selection.py."""

from __future__ import annotations

from engine.core.config import PopulationConfig


def clients_per_round(cfg: PopulationConfig) -> int:
    """K: the configured count, or max(1, round(fraction * N))."""
    part = cfg.participation
    if part.clients_per_round is not None:
        return part.clients_per_round
    return max(1, int(round(part.fraction * cfg.num_clients)))
