"""Events: what happened to whom in a slot or round (faults, joins, dropped updates), as
parallel arrays; the loops write one `events` row per event."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Event kinds, in the order a client meets them in a round.
CRASH, RECOVER, LEAVE, JOIN = "crash", "recover", "leave", "join"
LOST_DOWNLINK, DROPPED_BEFORE, DROPPED_AFTER, LOST_UPLINK = (
    "lost_downlink", "dropped_before", "dropped_after", "lost_uplink")
STRAGGLER, OVER_SELECTED = "straggler", "over_selected"
LINK_DOWN, MESSAGE_LOST = "link_down", "message_lost"  # peers
AGGREGATION_DROPPED = "aggregation_dropped"  # MoDeST: too few models by the timeout
NONFINITE = "nonfinite"  # an update with NaN or inf: dropped before aggregation
POOL_RESTART = "pool_restart"  # a pool actor replaced (client_id: the pool; value: seconds)


@dataclass(frozen=True)
class Events:
    """Faults of one slot or round: parallel arrays (kind, client id, value)."""

    kind: np.ndarray
    client_id: np.ndarray
    value: np.ndarray  # e.g. the downtime in slots of a crash; NaN when it has none

    @staticmethod
    def of(kind: str, ids: np.ndarray, value: np.ndarray | float = np.nan) -> Events:
        ids = np.asarray(ids, dtype=np.int64)
        return Events(np.full(ids.size, kind, dtype=object), ids,
                      np.broadcast_to(np.asarray(value, dtype=np.float64), ids.shape).copy())

    @staticmethod
    def concat(parts: list[Events]) -> Events:
        if not parts:
            return Events.of(CRASH, np.empty(0, np.int64))
        return Events(*(np.concatenate(c) for c in zip(
            *((p.kind, p.client_id, p.value) for p in parts), strict=True)))

    def count(self, kind: str) -> int:
        return int((self.kind == kind).sum())
