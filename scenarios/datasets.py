"""Datasets that need no download: LEAF-style Synthetic(alpha, beta) and scikit-learn's digits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.config import SyntheticConfig, TaskConfig
from engine.core.errors import ConfigError


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


def synthetic_leaf(
    cfg: SyntheticConfig, num_clients: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic(alpha, beta) of LEAF (Caldas et al., 2018), as used by FedProx (Li et al., 2020).

    Client k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its model W_k, b_k ~ N(u_k, 1); its
    input mean v_k ~ N(B_k, 1) per feature; x ~ N(v_k, diag(j^-1.2)); y = argmax(W_k x + b_k).
    As in the FedProx reference generator, alpha and beta are standard deviations.
    Returns x [n, F] float32, y [n] int64 and the owning client of each sample.
    """
    f, c = cfg.num_features, cfg.num_classes
    counts = _client_counts(cfg, num_clients, rng)
    owner = np.repeat(np.arange(num_clients), counts)
    u = rng.normal(0.0, cfg.alpha, num_clients)
    b_mean = rng.normal(0.0, cfg.beta, num_clients)
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


def _client_counts(cfg: SyntheticConfig, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Equal counts, or lognormal ones with the configured mean (LEAF draws a power law)."""
    if cfg.quantity_sigma == 0:
        return np.full(num_clients, cfg.samples_per_client, dtype=np.int64)
    s = cfg.quantity_sigma
    z = rng.lognormal(-0.5 * s * s, s, num_clients)
    return np.maximum(2, np.rint(cfg.samples_per_client * z)).astype(np.int64)


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


def load_dataset(cfg: TaskConfig, num_clients: int, rng: np.random.Generator) -> Dataset:
    """Build the task's data and hold out a test set for evaluating the global model."""
    if cfg.dataset == "synthetic":
        x, y, owner = synthetic_leaf(cfg.synthetic, num_clients, rng)
        num_classes, shape = cfg.synthetic.num_classes, (cfg.synthetic.num_features,)
    else:
        (x, y), owner = load_digits_arrays(), None
        num_classes, shape = 10, (1, 8, 8)
    held = holdout_mask(len(y), cfg.test_fraction, owner, rng)
    test_idx = np.flatnonzero(held)
    if test_idx.size == 0:
        raise ConfigError(f"task.test_fraction: {cfg.test_fraction} holds out no test sample; "
                          "raise it (or the samples per client)")
    if test_idx.size > cfg.max_test_samples:
        test_idx = np.sort(rng.choice(test_idx, cfg.max_test_samples, replace=False))
    return Dataset(
        x_train=x[~held], y_train=y[~held], x_test=x[test_idx], y_test=y[test_idx],
        num_classes=num_classes, input_shape=shape,
        owner_train=None if owner is None else owner[~held],
    )
