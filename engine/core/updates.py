"""Updates: what K clients send for one aggregation, column by column."""

from __future__ import annotations

from typing import NamedTuple

import torch

from engine.core.tree import TreeSums


class Updates(NamedTuple):
    """K clients' results for one aggregation, ordered by client id.

    When the aggregation is decomposable (`stage(..., decomposable=True)`), pools pre-reduce:
    `deltas` is None and `weighted_sums` holds their partial sums of weights * deltas.
    """

    deltas: torch.Tensor | None  # [K, P] float32: local params - global params
    weights: torch.Tensor  # [K] float32 (FedAvg: number of local samples)
    client_ids: torch.Tensor  # [K] int64
    losses: torch.Tensor  # [K] float32 mean local training loss
    num_samples: torch.Tensor  # [K] int64 local training samples
    steps: torch.Tensor | None = None  # [K] int64 local SGD steps taken
    label_counts: torch.Tensor | None = None  # [K, classes] int64 local training labels
    fisher: torch.Tensor | None = None  # [K, P] float32 diagonal Fisher of the local model
    staleness: torch.Tensor | None = None  # [K] int64 server versions since dispatch (async)
    weighted_sums: TreeSums | None = None

    @property
    def num_clients(self) -> int:
        return int(self.client_ids.numel())

    def per_client(self) -> tuple[torch.Tensor | None, ...]:
        """Every per-client column (all but the partial sums), in field order."""
        return self[:-1]

    def take(self, index: torch.Tensor) -> Updates:
        """Rows `index` of the per-client columns (partial sums are kept as they are)."""
        columns = [None if c is None else c[index] for c in self.per_client()]
        return Updates(*columns, weighted_sums=self.weighted_sums)

    @staticmethod
    def empty() -> Updates:
        """No client reported (every selected one failed): the round has nothing to add."""
        return Updates(None, torch.zeros(0), torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                       torch.zeros(0, dtype=torch.int64))

    @staticmethod
    def concat(parts: list[Updates]) -> Updates:
        """Join pools' updates and order them by client id (the reduction order is fixed)."""
        columns = [None if c[0] is None else torch.cat(c)
                   for c in zip(*(u.per_client() for u in parts), strict=True)]
        sums = [u.weighted_sums for u in parts if u.weighted_sums is not None]
        joined = Updates(*columns, weighted_sums=TreeSums.concat(sums) if sums else None)
        return joined.take(torch.argsort(joined.client_ids, stable=True))
