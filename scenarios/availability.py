"""Who is online in each slot (a round, or `slot_s` virtual seconds in asynchronous runs).

Each kind (registry AVAILABILITY) is a factory of its parameters; the engine fills the
population size and the seed tree. An `Availability`'s `mask(slot)` is a bool [n] that depends
only on (seed, slot), whatever order the slots are asked in. The kinds:

- always: everyone, every slot.
- bernoulli: heterogeneous, unknown participation (FedAU: Wang & Ji, 2023, "A Lightweight
  Method for Tackling Unknown Participation Statistics in Federated Averaging"): client i is
  online in each slot independently with its own p_i, drawn once from `probability`.
- cyclic: diurnal windows: a per-client phase, online for `online_fraction` of each `period`.
- markov: a two-state on/off chain per client (P(on->off) = p_on_off, P(off->on) = p_off_on per
  slot) started from its stationary law.
- trace: half-open [start, end) slot intervals per client from a Parquet/CSV file.
- anarchic: online like bernoulli, and each online client picks its own number of local steps
  per slot from `steps` (Anarchic FL: Yang et al., 2022, "Anarchic Federated Learning").

`rates` is each client's long-run online probability where the model defines one (logged for
analysis; the server never sees it).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from engine.core.errors import ConfigError
from engine.core.plugins import Registry
from engine.core.seeds import SeedTree
from scenarios.devices import check_client_ids, read_columns
from scenarios.distributions import DISTRIBUTIONS, Distribution, constant

KEY = "population.availability"
Probability = Annotated[float, Field(ge=0, le=1)]
Rates = Annotated[Distribution, DISTRIBUTIONS]
HALF = constant(0.5)
ONE = constant(1)


def _check_slot(slot: int) -> int:
    if int(slot) != slot or slot < 0:
        raise ValueError(f"slot must be a whole number >= 0 (got {slot!r})")
    return int(slot)


class Availability:
    """The base model: everyone online (kind `always`). Subclasses override `_online`;
    `chooses_steps` marks a model whose clients pick their own local steps."""

    chooses_steps = False

    def __init__(self, n: int, rates: np.ndarray | None) -> None:
        self.num_clients = n
        self.rates = rates

    def mask(self, slot: int) -> np.ndarray:
        """bool [n]: who is online in `slot`."""
        return self._online(_check_slot(slot))

    def local_steps(self, slot: int) -> np.ndarray | None:
        """int64 [n]: each online client's own local-step count in `slot` (0 if offline);
        None unless clients choose their own steps (anarchic)."""
        return None

    def _online(self, slot: int) -> np.ndarray:
        return np.ones(self.num_clients, dtype=bool)


class Bernoulli(Availability):
    """Client i online in slot t with probability p_i, independently over slots."""

    def __init__(self, rates: np.ndarray, seeds: SeedTree) -> None:
        super().__init__(rates.size, rates)
        self.seeds = seeds

    def _online(self, slot: int) -> np.ndarray:
        return self.seeds.rng("availability", slot).random(self.num_clients) < self.rates


class Anarchic(Bernoulli):
    """Bernoulli presence plus self-chosen local steps: round(draw from `steps`), at least 1."""

    chooses_steps = True

    def __init__(self, rates: np.ndarray, seeds: SeedTree, steps: Distribution) -> None:
        super().__init__(rates, seeds)
        self.steps = steps

    def local_steps(self, slot: int) -> np.ndarray:
        slot = _check_slot(slot)
        rng = self.seeds.rng("availability.steps", slot)
        wanted = self.steps.draw(self.num_clients, rng)
        steps = np.maximum(1, np.rint(wanted)).astype(np.int64)
        return np.where(self._online(slot), steps, 0)


class Cyclic(Availability):
    """Online when (t + phase_i) mod period < online_fraction * period; phase_i ~ U[0, period)."""

    def __init__(self, period: int, online_fraction: float, n: int, seeds: SeedTree) -> None:
        super().__init__(n, np.full(n, online_fraction))
        self.period = period
        self.window = online_fraction * period
        self.phase = seeds.rng("availability.phase").uniform(0.0, period, n)

    def _online(self, slot: int) -> np.ndarray:
        return np.mod(slot + self.phase, self.period) < self.window


class Markov(Availability):
    """Two-state on/off chains, stationary at slot 0; slot t's transitions come from
    rng("availability", t). The chain is cached forward, with a packed checkpoint every
    `every` slots so that asking an earlier slot replays at most `every` - 1 steps."""

    every = 64

    def __init__(self, p_on_off: float, p_off_on: float, n: int, seeds: SeedTree) -> None:
        total = p_on_off + p_off_on
        if total <= 0:
            raise ConfigError("p_on_off: p_on_off + p_off_on must be > 0 (a chain that never "
                              "moves has no stationary law)")
        stationary = p_off_on / total
        super().__init__(n, np.full(n, stationary))
        self.p_on_off, self.p_off_on, self.seeds = p_on_off, p_off_on, seeds
        start = seeds.rng("availability.start").random(n) < stationary
        self._checkpoints = {0: np.packbits(start)}
        self._slot, self._state = 0, start

    def _online(self, slot: int) -> np.ndarray:
        if slot < self._slot:
            base = slot - slot % self.every
            self._slot = base
            self._state = np.unpackbits(self._checkpoints[base], count=self.num_clients) > 0
        while self._slot < slot:
            self._step()
        return self._state.copy()

    def _step(self) -> None:
        """Advance the cached chain by one slot (transitions of slot `_slot` + 1)."""
        self._slot += 1
        u = self.seeds.rng("availability", self._slot).random(self.num_clients)
        self._state = np.where(self._state, u >= self.p_on_off, u < self.p_off_on)
        if self._slot % self.every == 0:
            self._checkpoints.setdefault(self._slot, np.packbits(self._state))


class Trace(Availability):
    """Online in slot t when one of the client's [start, end) intervals contains t."""

    def __init__(self, path: str, n: int) -> None:
        super().__init__(n, None)
        where = f"{KEY}.path"
        cols = read_columns(path, where, ("client_id", "start", "end"))
        check_client_ids(cols["client_id"], n, f"{where}: {path}", exactly_once=False)
        start, end = cols["start"], cols["end"]
        bad = np.isnan(start) | np.isnan(end) | (end < start)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(f"{where}: {path} row {row} has end < start or a missing "
                              f"value (start={start[row]}, end={end[row]})")
        order = np.argsort(start, kind="stable")  # intervals by start: a prefix has started
        self.client = cols["client_id"].astype(np.int64)[order]
        self.start, self.end = start[order], end[order]

    def _online(self, slot: int) -> np.ndarray:
        started = int(np.searchsorted(self.start, slot, side="right"))
        live = self.end[:started] > slot
        online = np.zeros(self.num_clients, dtype=bool)
        online[self.client[:started][live]] = True
        return online


def _rates(probability: Distribution, n: int, seeds: SeedTree) -> np.ndarray:
    """p_i per client, drawn once from `probability` and clipped to [0, 1]."""
    return np.clip(probability.draw(n, seeds.rng("availability.rates")), 0.0, 1.0)


def always(num_clients: int) -> Availability:
    """Everyone online in every slot."""
    return Availability(num_clients, np.ones(num_clients))


def bernoulli(num_clients: int, seeds: SeedTree, probability: Rates = HALF) -> Availability:
    """Heterogeneous, unknown participation: client i online with its own p_i per slot."""
    return Bernoulli(_rates(probability, num_clients, seeds), seeds)


def anarchic(num_clients: int, seeds: SeedTree, probability: Rates = HALF,
             steps: Rates = ONE) -> Availability:
    """Bernoulli presence, and each online client picks its own local steps from `steps`."""
    return Anarchic(_rates(probability, num_clients, seeds), seeds, steps)


def cyclic(num_clients: int, seeds: SeedTree, period: Annotated[int, Field(ge=1)] = 24,
           online_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5) -> Availability:
    """Diurnal windows: online for `online_fraction` of each `period`, a random phase each."""
    return Cyclic(period, online_fraction, num_clients, seeds)


def markov(num_clients: int, seeds: SeedTree, p_on_off: Probability = 0.1,
           p_off_on: Probability = 0.1) -> Availability:
    """A two-state on/off chain per client, started from its stationary law."""
    return Markov(p_on_off, p_off_on, num_clients, seeds)


def trace(num_clients: int, path: str) -> Availability:
    """[start, end) slot intervals per client from a Parquet/CSV file of client_id, start,
    end."""
    return Trace(path, num_clients)


AVAILABILITY: Registry[Availability] = Registry("availability model", {
    "always": always, "bernoulli": bernoulli, "anarchic": anarchic, "cyclic": cyclic,
    "markov": markov, "trace": trace,
}, engine=("num_clients", "seeds"))
