"""A federated task: the data, who owns which training sample, and the model architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from engine.core.config import SupermaskConfig
from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from scenarios.datasets import Dataset, holdout_mask, load_dataset
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
               max_test_samples: int, supermask: SupermaskConfig | None = None,
               validation_fraction: float = 0.0) -> FederatedTask | EnvTask:
    """The data (a DATASETS entry, test set held out), who owns each training sample (a
    PARTITIONS entry) and the model (a MODELS architecture), all from the seed tree. An
    environment entry gives an EnvTask instead: every client's environment, and the policy
    (the architecture with one output per action and one for the state value). With
    `validation_fraction` > 0 that share of the training samples (of each natural client's,
    if any) is held out for the server (`Dataset.x_val`), drawn from stream "validation"."""
    rng = seeds.rng("data")
    drawn = dataset(num_clients, rng)
    if isinstance(drawn, Environments):
        family = drawn.env.family
        model = ModelSpec(architecture, (family.obs_dim,), family.policy_outputs)
        model.build()
        return EnvTask(drawn, model, num_clients)
    data = load_dataset(drawn, num_clients, test_fraction, max_test_samples, rng)
    if validation_fraction > 0:
        data = _hold_validation(data, validation_fraction, seeds.rng("validation"))
    owner = partition(data.y_train, num_clients, partitioner, seeds.rng("partition"),
                      data.owner_train)
    model = ModelSpec(architecture, data.input_shape, data.num_classes, supermask,
                      weight_seed=seeds.integer("supermask_weights"))
    model.build()  # fail early on an architecture that does not fit the data
    return FederatedTask(data=data, owner=owner, model=model, num_clients=num_clients)


def _hold_validation(data: Dataset, fraction: float, rng) -> Dataset:
    """`fraction` of the training samples moved to the server's validation split."""
    held = holdout_mask(len(data.y_train), fraction, data.owner_train, rng)
    if not held.any():
        raise ConfigError(f"task.validation_fraction: {fraction} holds out no sample; raise it")
    owner = data.owner_train
    return replace(data, x_train=data.x_train[~held], y_train=data.y_train[~held],
                   x_val=data.x_train[held], y_val=data.y_train[held],
                   owner_train=None if owner is None else owner[~held])
