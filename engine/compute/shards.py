"""What every trainer of a shard shares: its sorted client ids, a client's row in it, and its
part of the fixed id tree of per-client values."""

from __future__ import annotations

import numpy as np
import torch

from engine.core import tree
from engine.core.tree import TreeSums


class ShardIds:
    """A block of clients by sorted id (a base of ShardTrainer and EnvTrainer)."""

    client_ids: np.ndarray  # int64 [n_local], sorted

    def local(self, client_ids: np.ndarray) -> torch.Tensor:
        """Rows of the shard's clients `client_ids` (a subset of it)."""
        return torch.from_numpy(np.searchsorted(self.client_ids, client_ids))

    def partial_sums(self, values: torch.Tensor, client_ids: torch.Tensor,
                     span: tuple[int, int] | None = None) -> TreeSums:
        """This shard's part of the fixed id tree of `values` (every node whose ids lie in
        `span`, default the shard's ids, entirely); merges in place into `values`."""
        leaves = TreeSums.leaves(values, client_ids)
        lo, hi = span or (int(self.client_ids[0]), int(self.client_ids[-1]) + 1)
        return tree.merge(leaves, lo, hi, overwrite=True)
