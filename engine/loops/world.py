"""The world of a synchronous federated run: who is online, whom the server picks, what fails,
and how long the round lasts in virtual time. Nothing here trains: a round's plan depends only
on the seed tree, the clients' devices and (power-of-choice) the losses they reported, so the
loop trains just the clients whose updates the server will use.

    online  = availability.mask(r) & liveness (crashes, churn)
    chosen  = selection policy over the online clients
    faults  = lost downlink / dropout before / dropout after / lost uplink
    arrival = latency + model / downlink + steps * step_s + update / uplink
    end     = the slowest reporting client, the K-th with over-selection, capped by a deadline
"""

from __future__ import annotations

import numpy as np
import torch

from engine.compute.training import LocalSGD, local_steps
from engine.core.config import ExperimentConfig
from engine.core.events import OVER_SELECTED, STRAGGLER, Events
from engine.core.plans import COMPLETED, RoundPlan
from engine.core.seeds import SeedTree
from policies.compression import Compressor
from policies.selection import Selection
from scenarios.availability import Availability
from scenarios.devices import Devices
from scenarios.failures import Liveness, round_faults
from scenarios.population import clients_per_round


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
                 compressor: Compressor) -> None:
        n = self.num_clients = cfg.population.num_clients
        self.cfg, self.sizes, self.hp, self.seeds = cfg, client_sizes, hp, seeds
        self.k = clients_per_round(cfg.population)
        self.availability, self.selection = availability, selection
        self.devices, self.liveness = devices, liveness
        controls = model_bytes if cfg.training.scaffold else 0  # SCAFFOLD's travel along
        self.transfer = model_bytes + controls  # down: the model
        self.upload = upload_bytes(compressor, model_bytes) + controls
        self.anarchic = availability.chooses_steps
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
        down = int((~faults.lost_downlink).sum()) * self.transfer
        plan = RoundPlan(r, self.clock, selected, status, steps, task, duration,
                         Events.concat([slot_events, faults.events(selected), *late]),
                         down + int(up_bytes.sum()), up_bytes)
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
