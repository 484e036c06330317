"""Partitioners (registry PARTITIONS): which client owns each training sample.

A partitioner is a function (labels, num_clients, rng, natural_owner, **parameters) -> owner
[n] (a client id per sample) in which every client owns at least one sample. `natural_owner`
is the dataset's own client of each sample, where it has one (LEAF-style synthetic data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import numpy as np
from pydantic import Field

from engine.core.errors import ConfigError
from engine.core.plugins import Registry

Concentration = Annotated[float, Field(gt=0)]
Partitioner = Callable[..., np.ndarray]


def natural(labels: np.ndarray, n: int, rng: np.random.Generator,
            natural_owner: np.ndarray | None) -> np.ndarray:
    """The dataset's own clients (each LEAF Synthetic client's, each file client's samples
    stay its own); the population must be exactly those clients."""
    if natural_owner is None:
        raise ConfigError("partition.kind: natural needs a per-client dataset (synthetic, "
                          "parquet, leaf); allowed here: " + ", ".join(n for n in PARTITIONS.names()
                                                        if n != "natural"))
    clients = int(natural_owner.max()) + 1 if natural_owner.size else 0
    if clients != n:
        raise ConfigError(f"partition.kind: natural keeps the data's own {clients} clients; set "
                          f"population.num_clients={clients} (it is {n})")
    return natural_owner.astype(np.int64)


def iid(labels: np.ndarray, n: int, rng: np.random.Generator,
        natural_owner: np.ndarray | None) -> np.ndarray:
    """Uniformly random, near-equal shares."""
    owner = np.empty(labels.size, dtype=np.int64)
    owner[rng.permutation(labels.size)] = np.arange(labels.size) % n
    return _ensure_nonempty(owner, n)


def dirichlet(labels: np.ndarray, n: int, rng: np.random.Generator,
              natural_owner: np.ndarray | None, alpha: Concentration = 0.5) -> np.ndarray:
    """Label skew: each class is split over clients with proportions ~ Dir(alpha)
    (Hsu et al., 2019, "Measuring the Effects of Non-Identical Data Distribution")."""
    owner = np.empty(labels.size, dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        owner[idx] = _split_by_proportions(idx.size, rng.dirichlet(np.full(n, alpha)))
    return _ensure_nonempty(owner, n)


def shards(labels: np.ndarray, n: int, rng: np.random.Generator,
           natural_owner: np.ndarray | None,
           shards_per_client: Annotated[int, Field(ge=1)] = 2) -> np.ndarray:
    """Pathological non-IID (McMahan et al., 2017): sort by label, cut into n * s shards,
    give each client s random shards."""
    order = rng.permutation(labels.size)
    order = order[np.argsort(labels[order], kind="stable")]
    num_shards = n * shards_per_client
    shard_of_client = rng.permutation(num_shards) % n
    owner = np.empty(labels.size, dtype=np.int64)
    for shard, idx in enumerate(np.array_split(order, num_shards)):
        owner[idx] = shard_of_client[shard]
    return _ensure_nonempty(owner, n)


def quantity(labels: np.ndarray, n: int, rng: np.random.Generator,
             natural_owner: np.ndarray | None, alpha: Concentration = 0.5) -> np.ndarray:
    """Quantity skew: shares of the (shuffled) samples ~ Dir(alpha) (Li et al., NIID-Bench)."""
    owner = np.empty(labels.size, dtype=np.int64)
    owner[rng.permutation(labels.size)] = _split_by_proportions(
        labels.size, rng.dirichlet(np.full(n, alpha))
    )
    return _ensure_nonempty(owner, n)


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


PARTITIONS: Registry[Partitioner] = Registry("partition", {
    "natural": natural, "iid": iid, "dirichlet": dirichlet, "shards": shards,
    "quantity": quantity,
}, runtime=("labels", "n", "rng", "natural_owner"))


def partition(labels: np.ndarray, num_clients: int, partitioner: Partitioner,
              rng: np.random.Generator, natural_owner: np.ndarray | None = None) -> np.ndarray:
    """owner [n] by `partitioner` (a PARTITIONS entry with its parameters bound)."""
    if labels.size < num_clients:
        raise ConfigError(
            f"population.num_clients: {num_clients} exceeds the {labels.size} training samples"
        )
    return partitioner(labels, num_clients, rng, natural_owner)
