"""Partitioners: which client owns each training sample.

Each returns `owner` [n] (a client id per sample) in which every client owns at least one sample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from engine.core.config import PartitionConfig
from engine.core.errors import ConfigError

Partitioner = Callable[[np.ndarray, int, PartitionConfig, np.random.Generator], np.ndarray]


def iid(labels: np.ndarray, n: int, cfg: PartitionConfig, rng: np.random.Generator) -> np.ndarray:
    """Uniformly random, near-equal shares."""
    owner = np.empty(labels.size, dtype=np.int64)
    owner[rng.permutation(labels.size)] = np.arange(labels.size) % n
    return owner


def dirichlet(labels, n, cfg, rng) -> np.ndarray:
    """Label skew: each class is split over clients with proportions ~ Dir(alpha)
    (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution")."""
    owner = np.empty(labels.size, dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        owner[idx] = _split_by_proportions(idx.size, rng.dirichlet(np.full(n, cfg.alpha)))
    return owner


def shards(labels, n, cfg, rng) -> np.ndarray:
    """Pathological non-IID (McMahan et al., 2017): sort by label, cut into n * s shards,
    give each client s random shards."""
    order = rng.permutation(labels.size)
    order = order[np.argsort(labels[order], kind="stable")]
    num_shards = n * cfg.shards_per_client
    shard_of_client = rng.permutation(num_shards) % n
    owner = np.empty(labels.size, dtype=np.int64)
    for shard, idx in enumerate(np.array_split(order, num_shards)):
        owner[idx] = shard_of_client[shard]
    return owner


def quantity(labels, n, cfg, rng) -> np.ndarray:
    """Quantity skew: shares of the (shuffled) samples ~ Dir(alpha) (Li et al., NIID-Bench)."""
    owner = np.empty(labels.size, dtype=np.int64)
    owner[rng.permutation(labels.size)] = _split_by_proportions(
        labels.size, rng.dirichlet(np.full(n, cfg.alpha))
    )
    return owner


def _split_by_proportions(size: int, proportions: np.ndarray) -> np.ndarray:
    cuts = np.rint(np.cumsum(proportions) * size).astype(np.int64)
    return np.searchsorted(cuts, np.arange(size), side="right")


def _ensure_nonempty(owner: np.ndarray, n: int) -> np.ndarray:
    """Give each empty client one sample taken from the currently largest client."""
    owner = owner.copy()
    counts = np.bincount(owner, minlength=n)
    for client in np.flatnonzero(counts == 0):
        donor = int(np.argmax(counts))
        sample = np.flatnonzero(owner == donor)[-1]
        owner[sample] = client
        counts[donor] -= 1
        counts[client] += 1
    return owner


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity": quantity,
}


def partition(
    labels: np.ndarray,
    num_clients: int,
    cfg: PartitionConfig,
    rng: np.random.Generator,
    natural_owner: np.ndarray | None = None,
) -> np.ndarray:
    """Dispatch on cfg.kind; `natural` keeps the dataset's own client of each sample."""
    if labels.size < num_clients:
        raise ConfigError(
            f"population.num_clients: {num_clients} exceeds the {labels.size} training samples"
        )
    if cfg.kind == "natural":
        if natural_owner is None:
            raise ConfigError("partition.kind: natural needs a per-client dataset (synthetic); "
                              "allowed here: " + ", ".join(PARTITIONERS))
        return natural_owner.astype(np.int64)
    return _ensure_nonempty(PARTITIONERS[cfg.kind](labels, num_clients, cfg, rng), num_clients)
