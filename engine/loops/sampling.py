"""MoDeST's rounds (policies/gossip.py, modest) planned in the same world as every peer run:
liveness (crashes, churn), availability, device profiles and lost messages. Like the other
worlds nothing here trains: a round's plan is a pure function of the seed tree and the world.

    S_r        = the first `sample_size` online peers of round r's seeded order
    trainers   = the peers of S_r that hold the last aggregate (all of S_r after a dropped
                 round, or in round 0), less those that drop out before training
    aggregators= the first `aggregators` peers of S_{r+1}
    arrival    = the trainer's task time (latency + steps + its uploads) + the aggregator's
                 download of one model; a message is lost with the uplink loss
    aggregate  = the uniform mean once floor(s * success_fraction) models arrived, or at
                 first arrival + timeout_s (or the round's selection.deadline_s, if
                 sooner) if at least min_models did, else none
    round model= the first aggregate to reach S_{r+1}; the members of S_{r+1} whose downlink
                 is not lost take it, and train from it in round r + 1

The round's W applies all of it at once: the rows of the receivers average the trained models
the winning aggregator included, and every other row keeps its own model.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from engine.compute.training import local_steps
from engine.core.config import FailuresConfig
from engine.core.events import AGGREGATION_DROPPED, LOST_DOWNLINK, LOST_UPLINK, Events
from engine.loops.world import PeerPlan, PeerWorld
from policies.consensus import Sampling
from scenarios.failures import round_faults


class SampledWorld:
    """Plans MoDeST's rounds over a PeerWorld's models (its liveness, availability, devices,
    hyperparameters and seed tree); `plan(r)` and `reported` as PeerWorld's."""

    def __init__(self, world: PeerWorld, sampling: Sampling, failures: FailuresConfig) -> None:
        self.world, self.sampling, self.network, self.n = world, sampling, world.network, world.n
        self.down_loss = failures.message_loss if failures.downlink_loss is None \
            else failures.downlink_loss
        self.up_loss = failures.message_loss if failures.uplink_loss is None \
            else failures.uplink_loss
        # the trainers' dropouts; their messages are lost per message, below
        self.dropouts = failures.model_copy(update={"downlink_loss": 0.0, "uplink_loss": 0.0})
        self._slots: dict[int, tuple[np.ndarray, Events]] = {}
        self.holders: np.ndarray | None = None  # who received the last aggregate
        self.clock = 0.0

    def online(self, r: int) -> tuple[np.ndarray, Events]:
        """Round r's mask of peers up and available, and its liveness events (stepped once:
        planning round r looks at round r + 1's sample)."""
        if r not in self._slots:
            up, events = self.world.liveness.step(r)
            self._slots[r] = (up & self.world.availability.mask(r), events)
        return self._slots[r]

    def sample(self, r: int) -> np.ndarray:
        """S_r in round r's seeded order: its first `sample_size` online peers."""
        online, _ = self.online(r)
        order = self.world.seeds.rng("sample", r).permutation(self.n)
        return order[online[order]][: self.sampling.sample_size]

    def plan(self, r: int) -> PeerPlan:
        s, world = self.sampling, self.world
        online, slot_events = self.online(r)
        self._slots.pop(r - 1, None)
        holders = np.sort(self.sample(r) if self.holders is None else self.holders)
        faults = round_faults(self.dropouts, holders, world.seeds.rng("faults", r))
        following = self.sample(r + 1)
        aggregators = following[: s.aggregators]
        trains, sends = holders[faults.trains], holders[faults.reports]
        steps = local_steps(world.hp, world.sizes[trains], world.seeds, trains, r)
        task = world.devices.task_time(trains, steps, 0.0, np.where(
            np.isin(trains, sends), aggregators.size * world.model_bytes, 0))
        sent_at = task[np.isin(trains, sends)]
        arrived = world.seeds.rng("faults_uplink", r).random((sends.size, aggregators.size)) \
            >= self.up_loss
        lost_up = np.argwhere(~arrived)
        events = [slot_events, faults.events(holders),
                  Events.of(LOST_UPLINK, sends[lost_up[:, 0]],
                            aggregators[lost_up[:, 1]].astype(np.float64))]
        best, included, ends = np.inf, sends[:0], [0.0, *task]
        for j, agg in enumerate(aggregators):
            at = sent_at[arrived[:, j]] + world.model_bytes / world.devices.down_bps[agg]
            ids, done = self._aggregated(sends[arrived[:, j]], at)
            if done is None:
                continue
            ends.append(done)
            if ids.size < min(s.min_models, s.needed):
                events.append(Events.of(AGGREGATION_DROPPED, [agg], float(ids.size)))
                continue
            delivered = done + float(world.devices.task_time(
                [agg], 0, 0.0, (following.size - 1) * world.model_bytes)[0])
            if delivered < best:
                best, included, winner = delivered, ids, int(agg)
        if np.isfinite(best):
            rng = world.seeds.rng("faults_downlink", r)
            lost = (rng.random(following.size) < self.down_loss) & (following != winner)
            events.append(Events.of(LOST_DOWNLINK, following[lost], float(winner)))
            self.holders, duration = np.sort(following[~lost]), best
        else:  # no aggregate: the next sample starts from the models it holds
            self.holders, winner, duration = None, None, max(ends)
        w = _aggregation(self.n, self.holders if winner is not None else None, included)
        plan = PeerPlan(r, self.clock, online, trains, w, Events.concat(events), duration,
                        winner)
        self.clock += duration
        return plan

    def _aggregated(self, ids: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, float | None]:
        """The models an aggregator averages (ids in arrival order) and when it does: at the
        needed-th arrival, else at the first one + timeout_s or the deadline, whichever
        comes first (None: nothing arrived)."""
        if not ids.size:
            return ids, None
        order = np.argsort(at, kind="stable")
        ids, at = ids[order], at[order]
        needed, deadline = self.sampling.needed, self.world.deadline_s
        if ids.size >= needed and (deadline is None or at[needed - 1] <= deadline):
            return ids[:needed], float(at[needed - 1])
        cut = float(at[0]) + self.sampling.timeout_s
        cut = cut if deadline is None else min(cut, deadline)
        return ids[at <= cut], cut

    def reported(self, ids: np.ndarray, losses: np.ndarray) -> None:
        self.world.reported(ids, losses)


def _aggregation(n: int, receivers: np.ndarray | None, included: np.ndarray) -> sparse.csr_matrix:
    """W: each receiver's row the uniform mean of the `included` models; the rest identity."""
    if receivers is None or not included.size:
        return sparse.identity(n, format="csr")
    keep = np.setdiff1d(np.arange(n), receivers)
    included = np.sort(included)
    rows = np.concatenate([np.repeat(receivers, included.size), keep])
    cols = np.concatenate([np.tile(included, receivers.size), keep])
    vals = np.concatenate([np.full(receivers.size * included.size, 1.0 / included.size),
                           np.ones(keep.size)])
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))
