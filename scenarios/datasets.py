"""Datasets that need no download (registry DATASETS): LEAF-style Synthetic(alpha, beta),
scikit-learn's digits, and users' own files (`parquet`, `leaf`: scenarios/user_data.py).
A dataset is a function (num_clients, rng, **parameters) -> Samples (in memory) or Stream
(block by block); scenarios/store.py holds out the test set and writes the client data store."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, NamedTuple

import numpy as np
from pydantic import Field

from engine.core.plugins import Registry
from scenarios.environments import Environments, cartpole_clients, pendulum_clients
from scenarios.user_data import leaf, parquet


@dataclass(frozen=True)
class Dataset:
    """What the driver holds of a dataset: its held-out splits (the clients' training rows
    live in the client data store, scenarios/store.py)."""

    x_test: np.ndarray  # float32 [n, F]
    y_test: np.ndarray  # int64 [n]
    num_classes: int
    input_shape: tuple[int, ...]  # per-sample shape the model sees; x is stored flat
    x_val: np.ndarray | None = None  # the server's validation split (task.validation_fraction)
    y_val: np.ndarray | None = None


class Samples(NamedTuple):
    """Pooled samples as a dataset yields them, before the test split."""

    x: np.ndarray  # float32 [n, F], flat
    y: np.ndarray  # int64 [n]
    owner: np.ndarray | None  # the natural client of each sample, if the data have one
    num_classes: int
    input_shape: tuple[int, ...]  # per-sample shape the model sees


class Stream(NamedTuple):
    """Samples drawn block by block, in sample order (a dataset too big to hold whole): the
    store writes each block as it comes."""

    blocks: Iterator[tuple[np.ndarray, np.ndarray]]  # (x float32 [b, F], y int64 [b])
    owner: np.ndarray | None  # the natural client of each sample, if the data have one
    num_classes: int
    input_shape: tuple[int, ...]


def whole(drawn: Samples | Stream) -> Samples:
    """A dataset's samples in memory (a Stream's blocks joined): for small data and tests."""
    if isinstance(drawn, Samples):
        return drawn
    xs, ys = zip(*drawn.blocks, strict=True)
    return Samples(np.concatenate(xs), np.concatenate(ys), drawn.owner, drawn.num_classes,
                   drawn.input_shape)


NonNegative = Annotated[float, Field(ge=0)]


def synthetic(num_clients: int, rng: np.random.Generator, alpha: NonNegative = 1.0,
              beta: NonNegative = 1.0, num_features: Annotated[int, Field(ge=1)] = 60,
              num_classes: Annotated[int, Field(ge=2)] = 10,
              samples_per_client: Annotated[int, Field(ge=2)] = 64,
              quantity_sigma: NonNegative = 0.0) -> Stream:
    """LEAF's Synthetic(alpha, beta) (Caldas et al., 2018): each client has its own softmax
    model and input law (see synthetic_leaf). `samples_per_client` is the mean count before
    the test split; `quantity_sigma` the lognormal spread of the counts (0: equal)."""
    counts = _client_counts(samples_per_client, quantity_sigma, num_clients, rng)
    owner = np.repeat(np.arange(num_clients), counts)
    return Stream(synthetic_leaf(alpha, beta, num_features, num_classes, counts, rng), owner,
                  num_classes, (num_features,))


def digits(num_clients: int, rng: np.random.Generator) -> Samples:
    """scikit-learn's 8x8 digits (1,797 images in 10 classes, shipped inside the package)."""
    x, y = load_digits_arrays()
    return Samples(x, y, None, 10, (1, 8, 8))


def synthetic_leaf(alpha: float, beta: float, f: int, c: int, counts: np.ndarray,
                   rng: np.random.Generator, block_rows: int = 1 << 18
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Synthetic(alpha, beta) of LEAF (Caldas et al., 2018), as used by FedProx (Li et al., 2020).

    Client k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its model W_k, b_k ~ N(u_k, 1); its
    input mean v_k ~ N(B_k, 1) per feature; x ~ N(v_k, diag(j^-1.2)); y = argmax(W_k x + b_k).
    As in the FedProx reference generator, alpha and beta are standard deviations.

    Yields (x [b, F] float32, y [b] int64) for whole clients in order, about `block_rows`
    samples at a time. The draws are those of drawing each quantity for all clients at once
    (u, B, then every W, every b, every v, every x's noise, from `rng` in that order): a copy
    of the generator starts each stream where it would have begun, so a block needs only its
    clients' models, and the bits do not depend on `block_rows`.
    """
    n = counts.size
    u = rng.normal(0.0, alpha, n)
    b_mean = rng.normal(0.0, beta, n)
    w_rng = copy.deepcopy(rng)
    _skip_normals(rng, n * c * f)
    bias_rng = copy.deepcopy(rng)
    _skip_normals(rng, n * c)
    v_rng = copy.deepcopy(rng)
    _skip_normals(rng, n * f)  # `rng` is now where the inputs' noise starts
    scale = np.arange(1, f + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
    ends = np.cumsum(counts)
    lo = 0
    while lo < n:
        done = int(ends[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, done + block_rows, side="right")))
        w = w_rng.normal(u[lo:hi, None, None], 1.0, (hi - lo, c, f))
        bias = bias_rng.normal(u[lo:hi, None], 1.0, (hi - lo, c))
        v = v_rng.normal(b_mean[lo:hi, None], 1.0, (hi - lo, f))
        owner = np.repeat(np.arange(hi - lo), counts[lo:hi])
        x = rng.standard_normal((owner.size, f))
        x *= scale
        x += v[owner]  # v[owner] + noise * scale, in place
        y = np.empty(owner.size, dtype=np.int64)
        for a in range(0, owner.size, 16_384):  # chunked: W[owner] for all samples is too big
            sl = slice(a, a + 16_384)
            logits = np.einsum("ncf,nf->nc", w[owner[sl]], x[sl]) + bias[owner[sl]]
            y[sl] = logits.argmax(axis=1)
        yield x.astype(np.float32), y
        lo = hi


def _skip_normals(rng: np.random.Generator, count: int, chunk: int = 1 << 22) -> None:
    """Advance `rng` past `count` normal draws (a normal with any mean and scale uses one
    standard normal), a chunk at a time."""
    for lo in range(0, count, chunk):
        rng.standard_normal(min(chunk, count - lo))


def _client_counts(mean: int, sigma: float, num_clients: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Equal counts, or lognormal ones with the configured mean (LEAF draws a power law)."""
    if sigma == 0:
        return np.full(num_clients, mean, dtype=np.int64)
    z = rng.lognormal(-0.5 * sigma * sigma, sigma, num_clients)
    return np.maximum(2, np.rint(mean * z)).astype(np.int64)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1,797 images, shipped inside the package), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)


def holdout_mask(n: int, fraction: float, owner: np.ndarray | None, rng: np.random.Generator):
    """Which samples are held out: `fraction` of each client's samples when owners are known
    (every client keeps at least one training sample), else `fraction` of all samples."""
    order = rng.permutation(n)
    if owner is None:
        mask = np.zeros(n, dtype=bool)
        mask[order[: int(round(n * fraction))]] = True
        return mask
    order = order[np.argsort(owner[order], kind="stable")]  # grouped by owner, random within
    counts = np.bincount(owner)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(n) - np.repeat(starts, counts)
    n_test = np.minimum(np.rint(counts * fraction).astype(np.int64), counts - 1)
    mask = np.zeros(n, dtype=bool)
    mask[order[rank < np.repeat(n_test, counts)]] = True
    return mask


DATASETS: Registry[Callable[..., Samples | Environments]] = Registry("dataset", {
    "digits": digits, "synthetic": synthetic,
    # users' own federated data, read from files (scenarios/user_data.py)
    "parquet": parquet, "leaf": leaf,
    # environments: clients learn by acting in them (scenarios/environments.py)
    "cartpole": cartpole_clients, "pendulum": pendulum_clients,
}, runtime=("num_clients", "rng"))
