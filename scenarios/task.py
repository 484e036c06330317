"""A federated task: the data, who owns which training sample, and the model architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.core.config import SupermaskConfig
from engine.core.seeds import SeedTree
from scenarios.datasets import Dataset
from scenarios.environments import Environments, EnvTask
from scenarios.models import ModelSpec
from scenarios.store import ClientStore, cached, describe, lookup, write_store


@dataclass(frozen=True)
class Shard:
    """The clients a pool owns (sorted ids: their per-client state lives with it) and the
    store it reads any client's rows from (`flipped`: the clients whose labels a
    label-flipping attack flips, as their rows are read)."""

    client_ids: np.ndarray  # int64 [n_local]
    store: ClientStore
    flipped: np.ndarray | None = None  # bool [N]

    def sizes(self, ids: np.ndarray) -> np.ndarray:
        """int64: the training rows of clients `ids`."""
        offsets = self.store.offsets
        return offsets[ids + 1] - offsets[ids]

    def read(self, reader, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): the rows of clients `ids`, one client after the other (labels as they
        see them), from `reader` (the store's RowReader)."""
        ids = np.asarray(ids, dtype=np.int64)
        sizes = self.sizes(ids)
        x, y = reader.read(self.store.offsets[ids], sizes)
        if self.flipped is not None and self.flipped[ids].any():
            rows = np.repeat(self.flipped[ids], sizes)
            y[rows] = self.store.num_classes - 1 - y[rows]
        return x, y


@dataclass(frozen=True)
class FederatedTask:
    data: Dataset  # the held-out splits (test, validation), in memory
    store: ClientStore  # every client's training rows
    model: ModelSpec
    num_clients: int
    flipped: np.ndarray | None = field(default=None)  # bool [N]: labels flipped (an attack)

    @property
    def client_sizes(self) -> np.ndarray:
        return self.store.sizes

    def shard(self, first: int, stop: int) -> Shard:
        """A pool that owns clients first..stop-1."""
        return Shard(np.arange(first, stop, dtype=np.int64), self.store, self.flipped)

    def train_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every client's training rows (x, y, owner), in client order, read into memory: for
        tests and benchmarks' references on small tasks."""
        ids = np.arange(self.num_clients)
        x, y = self.shard(0, self.num_clients).read(self.store.open(), ids)
        return x, y, np.repeat(ids, self.client_sizes)


def build_task(dataset: Callable, partitioner: Callable, architecture: Callable,
               num_clients: int, seeds: SeedTree, test_fraction: float,
               max_test_samples: int, supermask: SupermaskConfig | None = None,
               validation_fraction: float = 0.0) -> FederatedTask | EnvTask:
    """The data (a DATASETS entry, test set held out), who owns each training sample (a
    PARTITIONS entry) and the model (a MODELS architecture), all from the seed tree. The
    clients' rows go to the client data store (scenarios/store.py), built on first use and
    then read from its cache. An environment entry gives an EnvTask instead: every client's
    environment, and the policy (the architecture with one output per action and one for
    the state value). With `validation_fraction` > 0 that share of the training samples (of
    each natural client's, if any) is held out for the server (`Dataset.x_val`), drawn from
    stream "validation"."""
    key = {"dataset": describe(dataset), "partition": describe(partitioner),
           "num_clients": num_clients, "seed": seeds.seed, "test_fraction": test_fraction,
           "max_test_samples": max_test_samples, "validation_fraction": validation_fraction,
           "builder": describe(write_store)}
    rng = seeds.rng("data")
    store = lookup(key)
    if store is None:  # draw the dataset (an environment entry has no store)
        drawn = dataset(num_clients, rng)
        if isinstance(drawn, Environments):
            family = drawn.env.family
            model = ModelSpec(architecture, (family.obs_dim,), family.policy_outputs)
            model.build()
            return EnvTask(drawn, model, num_clients)
        store = cached(key, lambda folder: write_store(
            folder, drawn, num_clients, partitioner, seeds, rng, test_fraction,
            max_test_samples, validation_fraction))
    test = store.split("test")
    val = store.split("val")
    data = Dataset(test[0], test[1], store.num_classes, store.input_shape,
                   *(val if val is not None else (None, None)))
    model = ModelSpec(architecture, data.input_shape, data.num_classes, supermask,
                      weight_seed=seeds.integer("supermask_weights"))
    model.build()  # fail early on an architecture that does not fit the data
    return FederatedTask(data=data, store=store, model=model, num_clients=num_clients)
