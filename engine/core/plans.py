"""A synchronous round's plan: who was selected, what happens to each of them, how long the
round lasts in virtual time. The world plans it before anything trains (engine/loops/world.py);
the loop trains the clients it keeps and logs the rest."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.core.events import Events

COMPLETED = "completed"


@dataclass(frozen=True)
class RoundPlan:
    round: int
    start_s: float  # virtual time at which the round starts
    selected: np.ndarray  # sorted ids the server picked
    status: np.ndarray  # per selected client: completed, or the fault that removed it
    steps: np.ndarray  # per selected client: local steps (0 if it did not train)
    task_s: np.ndarray  # per selected client: dispatch to arrival (NaN if it did not train)
    duration_s: float
    events: Events  # the slot's crashes and churn, then the round's faults
    bytes: int  # the model down to every client it reached, updates up from those that sent
    up_bytes: np.ndarray  # per selected client: bytes it uploaded (compressed; 0 if none)
    # a modelled aggregation platform: (last kept arrival -> model ready, aggregator-seconds)
    aggregation: tuple[float, float] | None = None

    @property
    def kept(self) -> np.ndarray:
        """The clients whose updates the server aggregates."""
        return self.selected[self.status == COMPLETED]

    @property
    def trains(self) -> np.ndarray:
        """Selected clients that train (whether or not their update arrives in time)."""
        return self.steps > 0

    def marked(self, ids: np.ndarray, status: str) -> RoundPlan:
        """The plan with the status of the selected `ids` set to `status` (e.g. nonfinite)."""
        if not ids.size:
            return self
        changed = self.status.copy()
        changed[np.isin(self.selected, ids)] = status
        return dataclasses.replace(self, status=changed,
                                   events=Events.concat([self.events, Events.of(status, ids)]))


@dataclass
class Dispatch:
    """One client's task in an asynchronous run: sent model `version` at `start_s`, back (or
    its loss noticed) after `task_s`; trained lazily, so `delta` is filled when first needed."""

    seq: int  # dispatch number (the event id)
    client: int
    version: int
    start_s: float
    task_s: float
    steps: int
    status: str  # completed, or the fault that loses the update
    delta: torch.Tensor | None = None
    loss: float = math.nan
    samples: int = 0
    control: torch.Tensor | None = None  # SCAFFOLD: the client's delta c_i
    label_counts: torch.Tensor | None = None  # [classes] its training labels (FedDisco, MWA)
    fisher: torch.Tensor | None = None  # [P] its local model's diagonal Fisher (merging)
    pool: int = -1  # the pool that trained it
