"""The population's size per round: K of N. Who is online is scenarios/availability.py;
whom the server picks among them is policies/selection.py."""

from __future__ import annotations

from engine.core.config import PopulationConfig

FEDERATED_FRACTION = 0.1  # a server's K of N when participation is not set


def clients_per_round(cfg: PopulationConfig, default_fraction: float | None = None
                      ) -> int | None:
    """K: the configured count, or max(1, round(fraction * N)); with no participation set,
    `default_fraction` of N (None: every one, as gossip peers)."""
    part = cfg.participation
    if part is None:
        return None if default_fraction is None else max(
            1, int(round(default_fraction * cfg.num_clients)))
    if part.clients_per_round is not None:
        return part.clients_per_round
    return max(1, int(round(part.fraction * cfg.num_clients)))
