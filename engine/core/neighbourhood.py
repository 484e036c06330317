"""What a block of peers receives in one gossip step: the models it reads and the weights of
its rows of W (see policies/consensus.py for the policies that consume it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

MIX_ROWS = 16  # peers a block in `Neighbourhood.mix` (16 rows of W1's model: 615 KB)


class Forged(NamedTuple):
    """Messages Byzantine senders forge for particular receivers (e.g. the dissensus attack):
    the message in slot `slots[e]` of row `rows[e]` is `values[e]`, not the sender's model."""

    rows: torch.Tensor  # [e] int64
    slots: torch.Tensor  # [e] int64
    values: torch.Tensor  # [e, P] float32


class Evidence(NamedTuple):
    """A batch of each peer's own data, for policies that judge received models on it
    (`Consensus.evidence`): row i's samples are drawn from peer i's own rows only, keyed by
    (gossip step, peer), so they do not depend on the pool layout."""

    x: torch.Tensor  # [n, B, ...] inputs
    y: torch.Tensor  # [n, B] int64 labels
    mask: torch.Tensor  # [n, B] bool: False on padding (a peer with fewer than B samples)
    # (models [n, P], x [n, B, ...]) -> logits [n, B, C]: row i's model on row i's batch
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Neighbourhood(NamedTuple):
    """One gossip step as seen by a block of n peers.

    Row i reads `models[index[i, k]]` with weight `weights[i, k]` for k < D (its own model is
    one of them, at its place in global id order). Rows with fewer than D entries are padded
    with their own model and weight 0 (`valid` is False there).
    """

    models: torch.Tensor  # [M, P] float32: every model the block reads
    mass: torch.Tensor  # [M] float32: push-sum weights of those models (1 otherwise)
    index: torch.Tensor  # [n, D] int64 rows of `models`
    weights: torch.Tensor  # [n, D] float32 mixing weights (0 on padding)
    valid: torch.Tensor  # [n, D] bool
    own: torch.Tensor  # [n] int64: each peer's own row in `models`
    forged: Forged | None = None
    layers: tuple[tuple[int, int], ...] = ()  # (start, stop) of each parameter tensor
    ids: torch.Tensor | None = None  # [M] int64 global peer ids of `models`
    evidence: Evidence | None = None  # the peers' own data (policies that judge models)
    state: torch.Tensor | None = None  # [n, S] float64 the policy's per-peer state rows

    @property
    def num_peers(self) -> int:
        return int(self.index.shape[0])

    def own_models(self) -> torch.Tensor:
        return self.models[self.own]

    def received(self, k: int) -> torch.Tensor:
        """[n, P]: what each peer receives in slot k (forged messages substituted)."""
        out = self.models[self.index[:, k]]
        if self.forged is not None:
            hit = self.forged.slots == k
            if bool(hit.any()):
                out[self.forged.rows[hit]] = self.forged.values[hit]
        return out

    def weighted_sum(self, values: Callable[[int], torch.Tensor],
                     weights: torch.Tensor | None = None) -> torch.Tensor:
        """sum_k weights[:, k] * values(k), accumulated in slot order (fixed bits)."""
        w = self.weights if weights is None else weights
        out = w[:, 0, None] * values(0)
        for k in range(1, w.shape[1]):
            out.addcmul_(w[:, k, None], values(k))
        return out

    def mix(self) -> torch.Tensor:
        """[n, P]: sum_j W[i, j] x_j over what each peer receives. Without forged messages,
        `weighted_sum`'s operations block by block of MIX_ROWS rows: the same bits, with
        each block's received rows and sums kept in cache (W2's 500 peers a pool: 26 -> 11 ms
        a step, in-process under cProfile)."""
        if self.forged is not None:
            return self.weighted_sum(self.received)
        out = torch.empty(self.num_peers, self.models.shape[1], dtype=self.models.dtype)
        for a in range(0, self.num_peers, MIX_ROWS):
            index, w, block = self.index[a: a + MIX_ROWS], self.weights[a: a + MIX_ROWS], \
                out[a: a + MIX_ROWS]
            torch.mul(w[:, 0, None], self.models.index_select(0, index[:, 0]), out=block)
            for k in range(1, w.shape[1]):
                block.addcmul_(w[:, k, None], self.models.index_select(0, index[:, k]))
        return out

    def mix_mass(self) -> torch.Tensor:
        return (self.weights * self.mass[self.index]).sum(dim=1)

    def squared_distances(self) -> torch.Tensor:
        """[n, D] float64: ||received_k - own||^2 per slot (inf on padding)."""
        own = self.own_models()
        cols = [torch.linalg.vector_norm(self.received(k) - own, dim=1).double() ** 2
                for k in range(self.index.shape[1])]
        dist = torch.stack(cols, dim=1)
        return dist.masked_fill(~self.valid, float("inf"))


# (neighbourhood, Byzantine mask over its models [M]) -> forged messages, or None
Forge = Callable[[Neighbourhood, torch.Tensor], Forged | None]
