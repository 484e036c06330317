"""Pre-aggregation transforms (Updates -> Updates), chained before a reduction."""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from engine.core import parallel
from engine.core.updates import Updates
from policies.base import Aggregator, stage, stateless
from policies.robust import byzantine_count, stack


@stage("transform")
def clip_per_client(max_norm: Annotated[float, Field(gt=0)] = 10.0) -> Aggregator:
    """Per-client L2 norm clipping, delta * min(1, max_norm / ||delta||) (norm bounding as a
    defence: Sun et al., 2019, "Can You Really Backdoor Federated Learning?")."""

    def clip(u: Updates) -> Updates:
        x = stack(u, "clip_per_client")
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        factor = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), 1.0)
        return u._replace(deltas=x * factor)

    return stateless(clip)


def nearest_neighbour_matrix(dist: torch.Tensor, keep: int) -> torch.Tensor:
    """Row i averages the `keep` rows nearest to row i (itself included; ties: lower index)."""
    k = dist.shape[0]
    nearest = torch.argsort(dist, dim=1, stable=True)[:, :keep]
    mix = torch.zeros(k, k, dtype=torch.float64)
    return mix.scatter_(1, nearest, 1.0 / keep)


@stage("transform", mean_of_one=True)
def nnm(f: Annotated[int, Field(ge=0)] | None = None) -> Aggregator:
    """Nearest-neighbour mixing (Allouah et al., 2023, "Fixing by Mixing: A Recipe for Optimal
    Byzantine ML under Heterogeneity"): replace each update by the average of its K - f nearest
    updates (itself included). f defaults to the largest f < K/2."""

    def mix(u: Updates) -> Updates:
        x = stack(u, "nnm")
        k = x.shape[0]
        fk = byzantine_count(f, k, "nnm", (k - 1) // 2)
        dist = parallel.squared_distances(parallel.gram(x))
        return u._replace(deltas=parallel.combine(nearest_neighbour_matrix(dist, k - fk), x))

    return stateless(mix)._replace(min_updates=2 * (f or 0) + 1)  # f < K / 2


@stage("transform", permutation_invariant=False, mean_of_one=True)
def bucketing(bucket_size: Annotated[int, Field(ge=1)] = 2, *, seed: int) -> Aggregator:
    """Bucketing (Karimireddy et al., 2022, "Byzantine-Robust Learning on Heterogeneous Datasets
    via Bucketing"): shuffle the K updates at random and average them in buckets of
    `bucket_size`, giving ceil(K / bucket_size) updates for the robust reduction that follows.
    A bucket's weight, sample count, steps and label counts are its members' sums, its Fisher
    their mean, its id the lowest member id.
    The shuffle is keyed by (seed, round), over updates ordered by client id; the engine draws
    the seed from the run's seed tree."""

    def init(params: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.zeros((), dtype=torch.int64),)

    def update(u: Updates, state: tuple[torch.Tensor]) -> tuple[Updates, tuple]:
        x = stack(u, "bucketing")
        k = x.shape[0]
        order = np.random.default_rng([seed, int(state[0])]).permutation(k)
        bucket = torch.empty(k, dtype=torch.int64)
        bucket[torch.from_numpy(order)] = torch.arange(k) // bucket_size
        return _merge_buckets(u, x, bucket), (state[0] + 1,)

    return Aggregator(init, update)


def _merge_buckets(u: Updates, x: torch.Tensor, bucket: torch.Tensor) -> Updates:
    n = int(bucket.max()) + 1
    members = torch.zeros(n, x.shape[0], dtype=torch.float64)
    members[bucket, torch.arange(x.shape[0])] = 1.0
    size = members.sum(dim=1)

    def summed(column: torch.Tensor | None) -> torch.Tensor | None:
        if column is None:
            return None
        return torch.zeros((n, *column.shape[1:]), dtype=column.dtype).index_add_(0, bucket,
                                                                                  column)

    ids = torch.full((n,), torch.iinfo(torch.int64).max).scatter_reduce_(
        0, bucket, u.client_ids, "amin")
    merged = Updates(
        deltas=parallel.combine(members / size[:, None], x),
        weights=summed(u.weights), client_ids=ids,
        losses=(summed(u.losses.double()) / size).float(), num_samples=summed(u.num_samples),
        steps=summed(u.steps), label_counts=summed(u.label_counts),
        fisher=None if u.fisher is None else parallel.combine(members / size[:, None], u.fisher),
    )
    return merged.take(torch.argsort(ids))
