"""Seeded faults: crashes (crash-stop or crash-recover), churn, dropouts and lost messages.

Every fault is data: the functions here return which clients it hits, and the loops write one
`events` row per fault. Draws are keyed by (slot) or (round) through the seed tree, so the same
config and seed give the same faults, whatever the pool layout.

`Liveness` is the one stateful model (a crashed client stays down for its downtime): step it
once per slot, in order. The per-round faults of the selected clients are a pure function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.config import FailuresConfig
from engine.core.events import (
    CRASH,
    DROPPED_AFTER,
    DROPPED_BEFORE,
    JOIN,
    LEAVE,
    LOST_DOWNLINK,
    LOST_UPLINK,
    RECOVER,
    Events,
)
from engine.core.seeds import SeedTree
from scenarios.distributions import Distribution


class Liveness:
    """Who is up and present, slot by slot: crashes with `crash.rate` per slot, each down for
    a drawn number of slots (at least 1; forever without a downtime: crash-stop), and churn
    (a share absent at the start, scheduled leaves and joins)."""

    def __init__(self, cfg: FailuresConfig, n: int, seeds: SeedTree,
                 downtime: Distribution | None = None) -> None:
        self.cfg, self.n, self.seeds, self.downtime = cfg, n, seeds, downtime
        rng = seeds.rng("churn_start")
        self.present = rng.random(n) >= cfg.absent_at_start
        self.down_until = np.full(n, -1.0)  # slot a crashed client is back (inf: never)
        self.next_slot = 0

    def step(self, slot: int) -> tuple[np.ndarray, Events]:
        """The mask of clients up and present in `slot`, and the slot's events."""
        if slot != self.next_slot:
            raise ValueError(f"Liveness.step: expected slot {self.next_slot}, got {slot}")
        self.next_slot += 1
        events = [self._recoveries(slot), *self._churn(slot), self._crashes(slot)]
        return self.up(slot), Events.concat(events)

    def up(self, slot: int) -> np.ndarray:
        return self.present & (self.down_until <= slot)

    def _recoveries(self, slot: int) -> Events:
        back = np.flatnonzero(self.present & (self.down_until == slot))
        return Events.of(RECOVER, back)

    def _churn(self, slot: int) -> list[Events]:
        events = []
        for change in (c for c in self.cfg.churn if c.at == slot):
            rng = self.seeds.rng("churn", slot)
            leaving = _share(np.flatnonzero(self.present), change.leave, rng)
            joining = _share(np.flatnonzero(~self.present), change.join, rng)
            self.present[leaving] = False
            self.present[joining] = True
            events += [Events.of(LEAVE, leaving), Events.of(JOIN, joining)]
        return events

    def _crashes(self, slot: int) -> Events:
        if self.cfg.crash.rate == 0:
            return Events.of(CRASH, np.empty(0, np.int64))
        rng = self.seeds.rng("crash", slot)
        hit = np.flatnonzero(self.up(slot) & (rng.random(self.n) < self.cfg.crash.rate))
        downtime = (np.full(hit.size, np.inf) if self.downtime is None else
                    np.maximum(1, np.ceil(self.downtime.draw(hit.size, rng))))
        self.down_until[hit] = slot + 1 + downtime  # down from the next slot on
        return Events.of(CRASH, hit, downtime)


def peer_faults_configured(cfg: FailuresConfig) -> bool:
    """Whether a decentralized run has faults to inject (crashes, churn, dropouts, links,
    messages)."""
    return bool(cfg.crash.rate or cfg.absent_at_start or cfg.churn or cfg.link_failure
                or cfg.message_loss or cfg.dropout_before or cfg.dropout_after)


def _share(ids: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    count = int(round(share * ids.size))
    return np.sort(rng.choice(ids, size=count, replace=False)) if count else ids[:0]


@dataclass(frozen=True)
class RoundFaults:
    """What happens to each selected client in a round (boolean masks over `selected`)."""

    lost_downlink: np.ndarray  # the model never reached it: it does not train
    dropped_before: np.ndarray  # it leaves before training
    dropped_after: np.ndarray  # it trains, then never reports
    lost_uplink: np.ndarray  # it trains and sends; the update is lost

    @property
    def trains(self) -> np.ndarray:
        return ~(self.lost_downlink | self.dropped_before)

    @property
    def reports(self) -> np.ndarray:
        return self.trains & ~(self.dropped_after | self.lost_uplink)

    def status(self, completed: str = "completed") -> np.ndarray:
        """Per selected client: the fault that removed its update, else `completed`."""
        status = np.full(self.lost_downlink.size, completed, dtype=object)
        for kind in (LOST_DOWNLINK, DROPPED_BEFORE, DROPPED_AFTER, LOST_UPLINK):
            status[getattr(self, kind)] = kind
        return status

    def events(self, selected: np.ndarray) -> Events:
        masks = [(LOST_DOWNLINK, self.lost_downlink), (DROPPED_BEFORE, self.dropped_before),
                 (DROPPED_AFTER, self.dropped_after), (LOST_UPLINK, self.lost_uplink)]
        return Events.concat([Events.of(kind, selected[mask]) for kind, mask in masks])


def round_faults(cfg: FailuresConfig, selected: np.ndarray,
                 rng: np.random.Generator) -> RoundFaults:
    """Independent faults per selected client, each one only if the previous ones spared it
    (a client whose model was lost cannot also drop out)."""
    down = cfg.message_loss if cfg.downlink_loss is None else cfg.downlink_loss
    up = cfg.message_loss if cfg.uplink_loss is None else cfg.uplink_loss
    u = rng.random((4, selected.size))
    lost_downlink = u[0] < down
    dropped_before = ~lost_downlink & (u[1] < cfg.dropout_before)
    trains = ~(lost_downlink | dropped_before)
    dropped_after = trains & (u[2] < cfg.dropout_after)
    lost_uplink = trains & ~dropped_after & (u[3] < up)
    return RoundFaults(lost_downlink, dropped_before, dropped_after, lost_uplink)
