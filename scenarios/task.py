"""A federated task: the data, who owns which training sample, and the model architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.core.config import SupermaskConfig
from engine.core.seeds import SeedTree
from scenarios.datasets import Dataset, load_dataset
from scenarios.environments import Environments, EnvTask
from scenarios.models import ModelSpec
from scenarios.partition import partition


@dataclass(frozen=True)
class Shard:
    """A block of clients: sorted ids; client i's rows are x[offsets[i]:offsets[i+1]]."""

    client_ids: np.ndarray  # int64 [n_local]
    offsets: np.ndarray  # int64 [n_local + 1]
    x: np.ndarray  # float32 [rows, F]
    y: np.ndarray  # int64 [rows]


@dataclass(frozen=True)
class FederatedTask:
    data: Dataset
    owner: np.ndarray  # int64 [n_train]: the client that holds each training sample
    model: ModelSpec
    num_clients: int

    @property
    def client_sizes(self) -> np.ndarray:
        return np.bincount(self.owner, minlength=self.num_clients)

    def shard(self, first: int, stop: int) -> Shard:
        """Clients first..stop-1 with their rows, in CSR layout."""
        order = np.argsort(self.owner, kind="stable")
        offsets = np.concatenate([[0], np.cumsum(self.client_sizes)])
        rows = order[offsets[first] : offsets[stop]]
        return Shard(
            client_ids=np.arange(first, stop, dtype=np.int64),
            offsets=(offsets[first : stop + 1] - offsets[first]).astype(np.int64),
            x=self.data.x_train[rows],
            y=self.data.y_train[rows],
        )


def build_task(dataset: Callable, partitioner: Callable, architecture: Callable,
               num_clients: int, seeds: SeedTree, test_fraction: float,
               max_test_samples: int, supermask: SupermaskConfig | None = None
               ) -> FederatedTask | EnvTask:
    """The data (a DATASETS entry, test set held out), who owns each training sample (a
    PARTITIONS entry) and the model (a MODELS architecture), all from the seed tree. An
    environment entry gives an EnvTask instead: every client's environment, and the policy
    (the architecture with one output per action and one for the state value)."""
    rng = seeds.rng("data")
    drawn = dataset(num_clients, rng)
    if isinstance(drawn, Environments):
        family = drawn.env.family
        model = ModelSpec(architecture, (family.obs_dim,), family.policy_outputs)
        model.build()
        return EnvTask(drawn, model, num_clients)
    data = load_dataset(drawn, num_clients, test_fraction, max_test_samples, rng)
    owner = partition(data.y_train, num_clients, partitioner, seeds.rng("partition"),
                      data.owner_train)
    model = ModelSpec(architecture, data.input_shape, data.num_classes, supermask,
                      weight_seed=seeds.integer("supermask_weights"))
    model.build()  # fail early on an architecture that does not fit the data
    return FederatedTask(data=data, owner=owner, model=model, num_clients=num_clients)
