"""Datasets that need no download (registry DATASETS): LEAF-style Synthetic(alpha, beta),
scikit-learn's digits, and users' own files (`parquet`, `leaf`: scenarios/user_data.py).
A dataset is a function (num_clients, rng, **parameters) -> Samples;
`load_dataset` holds out the test set."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, NamedTuple

import numpy as np
from pydantic import Field

from engine.core.errors import ConfigError
from engine.core.plugins import Registry
from scenarios.environments import Environments, cartpole_clients, pendulum_clients
from scenarios.user_data import leaf, parquet


@dataclass(frozen=True)
class Dataset:
    """Pooled samples; `owner_train` is the natural client of each training sample, if any."""

    x_train: np.ndarray  # float32 [n, F]
    y_train: np.ndarray  # int64 [n]
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]  # per-sample shape the model sees; x is stored flat
    owner_train: np.ndarray | None = None
    x_val: np.ndarray | None = None  # the server's validation split (task.validation_fraction)
    y_val: np.ndarray | None = None


class Samples(NamedTuple):
    """Pooled samples as a dataset yields them, before the test split."""

    x: np.ndarray  # float32 [n, F], flat
    y: np.ndarray  # int64 [n]
    owner: np.ndarray | None  # the natural client of each sample, if the data have one
    num_classes: int
    input_shape: tuple[int, ...]  # per-sample shape the model sees


NonNegative = Annotated[float, Field(ge=0)]


def synthetic(num_clients: int, rng: np.random.Generator, alpha: NonNegative = 1.0,
              beta: NonNegative = 1.0, num_features: Annotated[int, Field(ge=1)] = 60,
              num_classes: Annotated[int, Field(ge=2)] = 10,
              samples_per_client: Annotated[int, Field(ge=2)] = 64,
              quantity_sigma: NonNegative = 0.0) -> Samples:
    """LEAF's Synthetic(alpha, beta) (Caldas et al., 2018): each client has its own softmax
    model and input law (see synthetic_leaf). `samples_per_client` is the mean count before
    the test split; `quantity_sigma` the lognormal spread of the counts (0: equal)."""
    counts = _client_counts(samples_per_client, quantity_sigma, num_clients, rng)
    x, y, owner = synthetic_leaf(alpha, beta, num_features, num_classes, counts, rng)
    return Samples(x, y, owner, num_classes, (num_features,))


def digits(num_clients: int, rng: np.random.Generator) -> Samples:
    """scikit-learn's 8x8 digits (1,797 images in 10 classes, shipped inside the package)."""
    x, y = load_digits_arrays()
    return Samples(x, y, None, 10, (1, 8, 8))


def synthetic_leaf(alpha: float, beta: float, f: int, c: int, counts: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic(alpha, beta) of LEAF (Caldas et al., 2018), as used by FedProx (Li et al., 2020).

    Client k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its model W_k, b_k ~ N(u_k, 1); its
    input mean v_k ~ N(B_k, 1) per feature; x ~ N(v_k, diag(j^-1.2)); y = argmax(W_k x + b_k).
    As in the FedProx reference generator, alpha and beta are standard deviations.
    Returns x [n, F] float32, y [n] int64 and the owning client of each sample.
    """
    num_clients = counts.size
    owner = np.repeat(np.arange(num_clients), counts)
    u = rng.normal(0.0, alpha, num_clients)
    b_mean = rng.normal(0.0, beta, num_clients)
    w = rng.normal(u[:, None, None], 1.0, (num_clients, c, f))
    bias = rng.normal(u[:, None], 1.0, (num_clients, c))
    v = rng.normal(b_mean[:, None], 1.0, (num_clients, f))
    scale = np.arange(1, f + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
    x = v[owner] + rng.standard_normal((owner.size, f)) * scale
    y = np.empty(owner.size, dtype=np.int64)
    for lo in range(0, owner.size, 16_384):  # chunked: W[owner] for all samples is too big
        sl = slice(lo, lo + 16_384)
        logits = np.einsum("ncf,nf->nc", w[owner[sl]], x[sl]) + bias[owner[sl]]
        y[sl] = logits.argmax(axis=1)
    return x.astype(np.float32), y, owner


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


def load_dataset(samples: Samples, num_clients: int, test_fraction: float,
                 max_test_samples: int, rng: np.random.Generator) -> Dataset:
    """The dataset's samples (a DATASETS entry's, drawn with `rng`) with a test set held out
    for evaluating the global model."""
    x, y, owner, num_classes, shape = samples
    held = holdout_mask(len(y), test_fraction, owner, rng)
    test_idx = np.flatnonzero(held)
    if test_idx.size == 0:
        raise ConfigError(f"task.test_fraction: {test_fraction} holds out no test sample; "
                          "raise it (or the samples per client)")
    if test_idx.size > max_test_samples:
        test_idx = np.sort(rng.choice(test_idx, max_test_samples, replace=False))
    return Dataset(
        x_train=x[~held], y_train=y[~held], x_test=x[test_idx], y_test=y[test_idx],
        num_classes=num_classes, input_shape=shape,
        owner_train=None if owner is None else owner[~held],
    )
