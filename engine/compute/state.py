"""Per-client state a pool keeps across rounds, as components the pool holds: rows of a
[n_local, P] tensor, one per client of its shard (RowState: peers' momentum buffers and
public copies), the same stored only for clients that have written one (LazyRows: client
pools' SCAFFOLD controls, error feedback's residuals, SCAFCOM's momentum, Streaming
DiLoCo's workers), and the peers' own models."""

from __future__ import annotations

import torch

from engine.core.checkpoint import dumps, loads


class Checkpointed:
    """A pool whose state a checkpoint can hold: `snapshot()` pickles the pool's attributes
    (per-client rows, peers' models, counters), leaving out the parts rebuilt from its spec
    and shard (REBUILT: the trainer with its data, the spec, evaluators); `restore` puts a
    snapshot's state into this pool, whose rebuilt parts stay."""

    REBUILT = ("trainer", "spec", "peers", "evaluator", "fisher")

    def _rebuilt(self) -> dict:
        return {name: getattr(self, name) for name in self.REBUILT
                if getattr(self, name, None) is not None}

    def snapshot(self) -> bytes:
        return dumps(self, self._rebuilt())

    def restore(self, data: bytes) -> None:
        self.__dict__.update(loads(data, self._rebuilt()).__dict__)


class RowState:
    """One [P] row per client of a shard, zero until written."""

    def __init__(self, num_clients: int, num_params: int) -> None:
        self.rows = torch.zeros(num_clients, num_params)

    def __getitem__(self, local: torch.Tensor) -> torch.Tensor:
        return self.rows[local]

    def put(self, local: torch.Tensor, values: torch.Tensor,
            keep: torch.Tensor | None = None) -> None:
        """rows[local] = values (only where `keep`, a bool mask over `local`, if given)."""
        if keep is None:
            self.rows[local] = values
        else:
            self.rows[local[keep]] = values[keep]

    def add(self, local: torch.Tensor, values: torch.Tensor) -> None:
        self.rows[local] += values

    def zero_(self) -> None:
        self.rows.zero_()


class LazyRows:
    """RowState's rows, stored only for the clients that have been written: a client's row
    is zero until its first `put` or `add`, which gives it a slot in a store that grows by
    doubling. A pool of a million clients of which a thousand train a round then holds
    SCAFFOLD's controls (or error feedback's residuals) for those that trained, not [n, P].
    The values are RowState's, bit for bit."""

    def __init__(self, num_clients: int, num_params: int) -> None:
        self.slot = torch.full((num_clients,), -1, dtype=torch.int64)
        self.store = torch.zeros(0, num_params)
        self.used = 0

    @property
    def stored(self) -> int:
        """How many clients hold a row."""
        return self.used

    def _slots(self, local: torch.Tensor) -> torch.Tensor:
        """The slots of `local` (distinct local ids), allocating the missing ones."""
        slots = self.slot[local]
        new = local[slots < 0]
        if new.numel():
            need = self.used + new.numel()
            if need > self.store.shape[0]:
                grown = torch.zeros(max(need, 2 * self.store.shape[0]), self.store.shape[1])
                grown[: self.used] = self.store[: self.used]
                self.store = grown
            self.slot[new] = torch.arange(self.used, need)
            self.used = need
            slots = self.slot[local]
        return slots

    def __getitem__(self, local: torch.Tensor) -> torch.Tensor:
        slots = self.slot[local]
        out = torch.zeros(slots.numel(), self.store.shape[1])
        have = slots >= 0
        out[have] = self.store[slots[have]]
        return out

    def put(self, local: torch.Tensor, values: torch.Tensor,
            keep: torch.Tensor | None = None) -> None:
        if keep is not None:
            local, values = local[keep], values[keep]
        slots = self._slots(local)  # first: it may grow (replace) the store
        self.store[slots] = values

    def add(self, local: torch.Tensor, values: torch.Tensor) -> None:
        slots = self._slots(local)
        self.store[slots] += values

    def zero_(self) -> None:
        self.slot.fill_(-1)
        self.store = torch.zeros(0, self.store.shape[1])
        self.used = 0


class PeerModels:
    """A block of peers' models: push-sum numerators x [n, P] and masses w [n]; a peer's model
    is z = x / w (w = 1 unless the policy is push-sum)."""

    def __init__(self, numer: torch.Tensor) -> None:
        self.numer = numer
        self.mass = torch.ones(numer.shape[0])

    def models(self) -> torch.Tensor:
        """[n, P]: the de-biased models x / w (a new tensor)."""
        return self.rows(torch.arange(self.numer.shape[0]))

    def rows(self, local: torch.Tensor) -> torch.Tensor:
        """[len(local), P]: the de-biased models x / w of rows `local` (a new tensor)."""
        span = _span(local)
        numer, mass = self.numer[span], self.mass[local]
        if bool((mass == 1).all()):
            return numer.clone() if isinstance(span, slice) else numer
        return numer / mass[:, None]

    def step(self, local: torch.Tensor, deltas: torch.Tensor) -> None:
        """x += delta at the rows `local` (SGP's update of the numerator)."""
        self.numer[_span(local)] += deltas

    def replace(self, numer: torch.Tensor, mass: torch.Tensor) -> None:
        self.numer, self.mass = numer, mass

    def average_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Rows a and b both take their mean (pairwise gossip), masses too."""
        self.numer[a] = self.numer[b] = (self.numer[a] + self.numer[b]) / 2
        self.mass[a] = self.mass[b] = (self.mass[a] + self.mass[b]) / 2

    def average_with(self, own: torch.Tensor, models: torch.Tensor, mass: torch.Tensor) -> None:
        """Rows `own` average with received rows (the other end of a cross-pool pair)."""
        self.numer[own] = (self.numer[own] + models) / 2
        self.mass[own] = (self.mass[own] + mass) / 2

    def set_all(self, models: torch.Tensor) -> None:
        """Every peer takes `models` ([P], or one row each); masses reset to 1."""
        self.numer = models.expand_as(self.numer).clone()
        self.mass = torch.ones_like(self.mass)


def _span(local: torch.Tensor) -> torch.Tensor | slice:
    """Rows `local` (distinct, as a pool's peers are) as a slice where they are consecutive,
    as when every peer of a block trains: a slice reads and adds in place, where an index
    gathers and scatters (W2's 500 peers: x += delta 6 -> 1.4 ms)."""
    n = local.numel()
    if n and torch.equal(local, torch.arange(int(local[0]), int(local[0]) + n)):
        return slice(int(local[0]), int(local[0]) + n)
    return local
