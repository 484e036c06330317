"""Communication schedules of synchronous gossip: how many gossip steps each round takes.

Zhu, Zhang, Wang, Zhou & Wang, 2025, "A Single Merging Suffices: Recovering Server-based
Learning Performance in Decentralized Learning" (arXiv:2507.06542; later "On the Surprising
Effectiveness of a Single Global Merging in Decentralized Learning", ICLR 2026) study *when*
decentralized peers should communicate under a fixed budget, and find that concentrating the
budget late in training, followed by one global merge (`gossip.final_merge`), beats spreading
it evenly. A schedule here is a pure function of the run's length and a budget: int64
[rounds] gossip steps per round, summing to the budget. A round with 0 steps trains only.

Departures: the paper spends its budget as the fraction of iterations at which peers gossip
(one gossip step after some local SGD steps); here a round is local training followed by
its gossip steps, so the budget is counted in gossip steps over the run's rounds.
"""

from __future__ import annotations

import numpy as np

from engine.core.errors import ConfigError

SCHEDULES = ("constant", "uniform", "increasing", "late")


def _from_cumulative(cumulative: np.ndarray) -> np.ndarray:
    """Per-round steps from the (real) cumulative budget at the end of each round: the floor
    of it, differenced, so the steps sum exactly to the total."""
    ends = np.floor(cumulative + 1e-9).astype(np.int64)
    return np.diff(np.concatenate([[0], ends]))


def gossip_schedule(kind: str, rounds: int, steps: int = 1, budget: int | None = None,
                    late_fraction: float | None = None) -> np.ndarray:
    """int64 [rounds]: the gossip steps of each round.

    constant:   `steps` every round (no budget).
    uniform:    `budget` steps spread evenly: round r ends with floor((r + 1) B / R) in all.
    increasing: the budget grows linearly over rounds, round r's share proportional to r + 1.
    late:       nothing during the first rounds, then the budget spread evenly over the last
                ceil(late_fraction * R) rounds (the paper's "communicate late")."""
    where = "gossip.schedule"
    if kind not in SCHEDULES:
        raise ConfigError(f"{where}.kind: unknown {kind!r}; one of {', '.join(SCHEDULES)}")
    if kind == "constant":
        if budget is not None:
            raise ConfigError(f"{where}.budget: a constant schedule takes gossip.steps every "
                              "round; budget is for kind uniform, increasing or late")
        if late_fraction is not None:
            raise ConfigError(f"{where}.late_fraction: only with kind late")
        return np.full(rounds, steps, dtype=np.int64)
    if budget is None:
        raise ConfigError(f"{where}.budget: kind {kind} needs the total number of gossip "
                          "steps over the run")
    if kind != "late" and late_fraction is not None:
        raise ConfigError(f"{where}.late_fraction: only with kind late (got kind {kind})")
    r = np.arange(1, rounds + 1, dtype=np.float64)
    if kind == "uniform":
        return _from_cumulative(budget * r / rounds)
    if kind == "increasing":
        return _from_cumulative(budget * r * (r + 1) / (rounds * (rounds + 1)))
    fraction = 0.5 if late_fraction is None else late_fraction
    span = max(1, int(np.ceil(fraction * rounds - 1e-9)))
    start = rounds - span
    return _from_cumulative(budget * np.clip(r - start, 0, None) / span)
