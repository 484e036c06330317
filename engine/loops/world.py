"""The world of a synchronous federated run: who is online, whom the server picks, what fails,
and how long the round lasts in virtual time. Nothing here trains: a round's plan depends only
on the seed tree, the clients' devices and (power-of-choice) the losses they reported, so the
loop trains just the clients whose updates the server will use.

    online  = availability.mask(r) & liveness (crashes, churn)
    chosen  = selection policy over the online clients
    faults  = lost downlink / dropout before / dropout after / lost uplink
    arrival = latency + model / downlink + steps * step_s + update / uplink
    end     = the slowest reporting client, the K-th with over-selection, capped by a deadline
              (+ the aggregation platform's latency, when one is modelled)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from engine.compute.training import LocalSGD, local_steps
from engine.core.config import ExperimentConfig, FailuresConfig
from engine.core.events import OVER_SELECTED, STRAGGLER, Events
from engine.core.plans import COMPLETED, RoundPlan
from engine.core.seeds import SeedTree
from policies.compression import Compressor
from policies.selection import Selection
from policies.streaming import fragment_bytes
from scenarios.availability import Availability
from scenarios.devices import Devices
from scenarios.failures import Liveness, round_faults
from scenarios.network import Network
from scenarios.platforms import Platform
from scenarios.population import FEDERATED_FRACTION, clients_per_round


def upload_bytes(compressor: Compressor, model_bytes: int) -> int:
    """Wire bytes of one client's update: the compressor's size for this model (a function
    of the parameter count for every kind), or the model's bytes uncompressed."""
    if compressor.lossless:
        return model_bytes
    zeros = torch.zeros(1, model_bytes // 4)
    return int(compressor.compress(zeros, np.zeros(1, np.uint64)).bytes[0])


class SyncWorld:
    """Plans each synchronous round from the world's models (one slot per round): who is
    online (availability and liveness), whom the selection policy picks, their devices."""

    def __init__(self, cfg: ExperimentConfig, client_sizes: np.ndarray, hp: LocalSGD,
                 model_bytes: int, seeds: SeedTree, availability: Availability,
                 selection: Selection, devices: Devices, liveness: Liveness,
                 compressor: Compressor, platform: Platform | None = None) -> None:
        n = self.num_clients = cfg.population.num_clients
        self.cfg, self.sizes, self.hp, self.seeds = cfg, client_sizes, hp, seeds
        self.k = clients_per_round(cfg.population, FEDERATED_FRACTION)
        self.availability, self.selection = availability, selection
        self.devices, self.liveness = devices, liveness
        controls = model_bytes if cfg.training.scaffold else 0  # SCAFFOLD's travel along
        self.transfer = model_bytes + controls  # down: the model
        # SCALLION / SCAFCOM upload one compressed vector, SCAFFOLD's change of c_i, only
        one_vector = cfg.training.compression.controlled is not None
        self.upload = upload_bytes(compressor, model_bytes) + (0 if one_vector else controls)
        s = cfg.training.streaming
        if s is not None:  # Streaming DiLoCo: a fragment up (quantised) and down (float32)
            self.transfer = fragment_bytes(model_bytes // 4, s.fragments, 32)
            self.upload = fragment_bytes(model_bytes // 4, s.fragments, s.bits)
        self.anarchic = availability.chooses_steps
        self.platform = platform if platform is not None and platform.modelled else None
        self.losses = np.full(n, np.inf)  # last reported training loss (power-of-choice)
        self.clock = 0.0

    def plan(self, r: int) -> RoundPlan:
        up, slot_events = self.liveness.step(r)
        online = np.flatnonzero(up & self.availability.mask(r))
        selected = self._select(online, self.seeds.rng("selection", r))
        faults = round_faults(self.cfg.failures, selected, self.seeds.rng("faults", r))
        steps = np.where(faults.trains, self.steps(selected, r), 0)
        up_bytes = np.where(faults.reports | faults.lost_uplink, self.upload, 0)  # sent
        task = np.where(faults.trains, self.devices.task_time(selected, steps, self.transfer,
                                                              up_bytes), np.nan)
        status, duration, late = self._close(selected, faults, task)
        timing = None
        if self.platform is not None:  # the model is ready once the aggregators are done
            timing = self.platform.timing(task[status == COMPLETED], self.upload, duration)
            duration += timing.latency_s
        down = int((~faults.lost_downlink).sum()) * self.transfer
        plan = RoundPlan(r, self.clock, selected, status, steps, task, duration,
                         Events.concat([slot_events, faults.events(selected), *late]),
                         down + int(up_bytes.sum()), up_bytes,
                         None if timing is None else (timing.latency_s, timing.aggregator_s))
        self.clock += duration
        return plan

    def reported(self, ids: np.ndarray, losses: np.ndarray) -> None:
        self.losses[ids] = losses

    def _select(self, online: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.selection.choose(online, self.k, self.losses, rng)

    def steps(self, ids: np.ndarray, r: int) -> np.ndarray:
        """Local steps of `ids` in round (or dispatch) r: the config's epochs cut to the step
        budget, or (anarchic) to the number each client chose (at most its epochs' batches:
        a budget only cuts a client's batch plan)."""
        steps = local_steps(self.hp, self.sizes[ids], self.seeds, ids, r)
        anarchic = self.availability.local_steps(r)
        return steps if anarchic is None else np.minimum(steps, anarchic[ids])

    def _close(self, selected, faults, task) -> tuple[np.ndarray, float, list[Events]]:
        """Statuses and the round's length. The round closes at the last report (with
        over-selection, at the K-th), or at the deadline if that comes first, or (nobody
        reports) when the trainers would be done. A report after the close is over-selected if
        K reports closed the round, else a straggler."""
        status = faults.status(COMPLETED)
        arrivals = np.where(faults.reports, task, np.inf)
        rank = np.empty(selected.size, np.int64)
        rank[np.argsort(arrivals, kind="stable")] = np.arange(selected.size)
        reports, deadline = int(faults.reports.sum()), self.cfg.selection.deadline_s
        enough = self.selection.closes_at_k and reports >= self.k
        if reports:
            close = float(arrivals[rank == (self.k if enough else reports) - 1][0])
        else:
            close = float(np.nanmax(task)) if faults.trains.any() else 0.0
        if deadline is not None and (close > deadline or not reports):
            close, enough = deadline, False
        kept = faults.reports & (arrivals <= close) & (rank < (self.k if enough else reports))
        missed = faults.reports & ~kept
        kind = OVER_SELECTED if enough else STRAGGLER
        status[missed] = kind
        return status, close, [Events.of(kind, selected[missed], task[missed])]


@dataclass(frozen=True)
class PeerPlan:
    """A synchronous gossip round's plan: who is up and online, who trains, the round's W
    among them, the round's events and how long it lasts in virtual time."""

    round: int
    start_s: float
    online: np.ndarray  # bool [n]: up, available and on time
    trainers: np.ndarray | None  # ids that train (None: every peer)
    w: sparse.csr_matrix
    events: Events
    duration_s: float
    evaluated: int | None = None  # the peer holding the round's model (MoDeST's aggregate)


class PeerWorld:
    """Plans each synchronous gossip round from the same world models as a federated run:
    liveness (crashes, churn), availability, selection of the peers that train (K of the
    online ones; every one by default), device profiles and a deadline. An offline peer
    neither trains nor gossips: W is built among the online peers (their rows renormalised,
    as for crashes). The round lasts as long as its slowest online peer (latency + its steps
    + its gossip messages in and out), or its deadline: a peer later than that is a straggler,
    offline for the round; with over-selection, so are the trainers after the K-th to
    finish, and so are trainers that drop out (before training, or after it)."""

    def __init__(self, network: Network, failures: FailuresConfig, liveness: Liveness,
                 availability: Availability, selection: Selection, k: int | None,
                 devices: Devices, hp: LocalSGD, sizes: np.ndarray, seeds: SeedTree,
                 message_bytes: int, gossip_steps: int | np.ndarray, deadline_s: float | None,
                 faults: bool) -> None:
        self.network, self.failures, self.liveness = network, failures, liveness
        self.availability, self.selection, self.k = availability, selection, k
        self.devices, self.hp, self.sizes, self.seeds = devices, hp, sizes, seeds
        # one gossip message: a model, or a compressed difference (CHOCO); MoDeST's whole models
        self.model_bytes, self.gossip_steps, self.deadline_s = message_bytes, gossip_steps, \
            deadline_s
        self.faults, self.n = faults, network.n
        self.losses = np.full(self.n, np.inf)
        self.clock = 0.0

    def plan(self, r: int) -> PeerPlan:
        up, events = self.liveness.step(r)
        online = up & self.availability.mask(r)
        every = bool(online.all()) and not self.faults and self.k is None \
            and self.deadline_s is None
        if every:  # the plain graph's W, every peer trains
            w, lost, trainers = self.network.mixing(r), Events.concat([]), None
        else:
            w, lost = self.network.faulty_mixing(r, online, self.failures)
            trainers = self._trainers(online, r)
        trainers, dropped, dropouts = self._dropouts(trainers, r)
        task = self._task_times(w, online, trainers, r)
        over = self._over_selected(trainers, task)
        late = np.zeros(self.n, dtype=bool)
        if self.deadline_s is not None:
            late = online & ~over & ~dropped & (task > self.deadline_s)
        if over.any() or late.any() or dropped.any():  # offline: W among the others
            trained_first = dropped & ~over & ~late  # dropped after training: trains, silent
            online = online & ~over & ~late & ~dropped
            w, lost = self.network.faulty_mixing(r, online, self.failures)
            trainers = trainers[(online | trained_first)[trainers]]
        on_time = task[online]
        duration = self.deadline_s if late.any() else (float(on_time.max()) if on_time.size
                                                       else 0.0)
        plan = PeerPlan(r, self.clock, online, trainers, w, Events.concat([
            events, lost, dropouts, Events.of(STRAGGLER, np.flatnonzero(late), task[late]),
            Events.of(OVER_SELECTED, np.flatnonzero(over), task[over])]), duration)
        self.clock += duration
        return plan

    def _dropouts(self, trainers: np.ndarray | None, r: int
                  ) -> tuple[np.ndarray | None, np.ndarray, Events]:
        """failures.dropout_before / dropout_after among the round's trainers: the first
        leave before training, the second after it; both are offline for the round's gossip.
        Returns the trainers less the first, the mask of both, and their events."""
        dropped = np.zeros(self.n, dtype=bool)
        f = self.failures
        if trainers is None or not (f.dropout_before or f.dropout_after):
            return trainers, dropped, Events.concat([])
        only = f.model_copy(update={"message_loss": 0.0, "uplink_loss": 0.0,
                                    "downlink_loss": 0.0})
        faults = round_faults(only, trainers, self.seeds.rng("faults", r))
        dropped[trainers[faults.dropped_before | faults.dropped_after]] = True
        return trainers[~faults.dropped_before], dropped, faults.events(trainers)

    def _over_selected(self, trainers: np.ndarray | None, task: np.ndarray) -> np.ndarray:
        """With over-selection, the trainers after the K-th to finish (ties: lower id first):
        their work is not used, and they sit the round out."""
        over = np.zeros(self.n, dtype=bool)
        if trainers is None or self.k is None or not self.selection.closes_at_k \
                or trainers.size <= self.k:
            return over
        order = np.argsort(task[trainers], kind="stable")
        over[trainers[order[self.k:]]] = True
        return over

    def reported(self, ids: np.ndarray, losses: np.ndarray) -> None:
        self.losses[ids] = losses

    def _trainers(self, online: np.ndarray, r: int) -> np.ndarray:
        ids = np.flatnonzero(online)
        if self.k is None or self.k >= ids.size:
            return ids
        return self.selection.choose(ids, self.k, self.losses, self.seeds.rng("selection", r))

    def _task_times(self, w: sparse.csr_matrix, online: np.ndarray,
                    trainers: np.ndarray | None, r: int) -> np.ndarray:
        """Per peer: latency + its local steps + the models it receives and sends over the
        round's gossip steps (inf for an offline peer)."""
        ids = np.arange(self.n)
        degree = np.diff(w.indptr) - 1  # off-diagonal entries of its row: messages received
        sent = np.bincount(w.indices, minlength=self.n) - 1  # rows that read it: messages sent
        trains = np.ones(self.n, dtype=bool) if trainers is None else np.isin(ids, trainers)
        steps = np.where(trains, local_steps(self.hp, self.sizes, self.seeds, ids, r), 0)
        steps_r = self.gossip_steps if np.isscalar(self.gossip_steps) else \
            int(self.gossip_steps[min(r, len(self.gossip_steps) - 1)])
        messages = steps_r * self.model_bytes
        task = self.devices.task_time(ids, steps, np.maximum(degree, 0) * messages,
                                      np.maximum(sent, 0) * messages)
        return np.where(online, task, np.inf)
