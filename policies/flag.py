"""The Flag aggregator (Almasi et al., 2024, "Flag Aggregator: Scalable Distributed Training
under Failures and Augmented Losses using Convex Optimization").

FA normalises the K updates x_i = g_i / ||g_i||, finds an m-dimensional subspace Y that
maximises the Beta-likelihood of their reconstruction ratios ||Y^T x_i||^2 by iteratively
reweighted least squares (IRLS), and returns the projection of their sum, (1/m) Y Y^T sum_i x_i.
One IRLS step takes Y as the top-m eigenvectors of X W X^T with data weights
(|1 - ||Y^T x_i||^2| + eps)^(-1/2) and, for lambda > 0, pairwise terms on x_i - x_j with weights
(lambda / (K (K - 1)))^2 (|1 - ||Y^T (x_i - x_j)||^2| + eps)^(-1/2), as the authors' code does.

Everything lives in span(X): with the normalised Gram matrix Q diag(s) Q^T, the columns of
B = diag(s)^(1/2) Q^T are the updates' coordinates in an orthonormal basis of that span, so the
IRLS runs on K x K matrices and only the final combination touches the [K, P] stack.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from engine.core import parallel
from engine.core.updates import Updates
from policies.base import Aggregator, stage, stateless
from policies.robust import stack

_EPS = 1e-7


def _irls_weights(b: torch.Tensor, z: torch.Tensor, lam: float) -> torch.Tensor:
    """W [K, K] of one IRLS step for the subspace z (orthonormal columns, coordinates B)."""
    k = b.shape[1]
    residual = (1 - ((z.T @ b) ** 2).sum(dim=0)).abs()
    w = torch.diag((residual + _EPS).rsqrt())
    if lam > 0 and k > 1:
        proj = z.T @ b  # [m, K]
        pair_residual = (1 - torch.cdist(proj.T, proj.T) ** 2).abs()
        c2 = (lam / (k * (k - 1))) ** 2 * (pair_residual + _EPS).rsqrt()
        c2.fill_diagonal_(0)
        w += 2 * (torch.diag(c2.sum(dim=1)) - c2)  # sum over ordered pairs of (e_i-e_j)(..)^T
    return w


def _top_subspace(b: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    _, vectors = torch.linalg.eigh(b @ w @ b.T)
    return vectors[:, -m:]


def _objective(b: torch.Tensor, z: torch.Tensor) -> float:
    return float((1 - ((z.T @ b) ** 2).sum(dim=0)).clamp_min(0).sqrt().sum())


def flag_coefficients(g: torch.Tensor, m: int, lam: float, iterations: int) -> torch.Tensor:
    """Coefficients c [K] with Y Y^T sum_i x_i = sum_i c_i g_i, from the Gram matrix g of the
    raw updates g_i (float64)."""
    norms = g.diagonal().clamp_min(0).sqrt()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    gn = g / safe[:, None] / safe[None, :]
    s, q = torch.linalg.eigh(gn)
    keep = s > 1e-10 * s.max().clamp_min(1e-300)
    s, q = s[keep], q[:, keep]
    b = s.sqrt()[:, None] * q.T  # [r, K] coordinates of the normalised updates
    m = min(m, b.shape[0])
    z = _top_subspace(b, _irls_weights(b, torch.zeros(b.shape[0], 0, dtype=b.dtype), lam), m)
    best = _objective(b, z)
    for _ in range(iterations - 1):
        candidate = _top_subspace(b, _irls_weights(b, z, lam), m)
        value = _objective(b, candidate)
        if value >= best - 1e-10:
            break
        z, best = candidate, value
    out = z @ (z.T @ b.sum(dim=1))  # coordinates of Y Y^T sum_i x_i
    return (q @ (out / s.sqrt())) / safe  # back to coefficients over the raw rows


@stage("reduction", mean_of_one=True)
def flag_aggregator(subspace_dim: Annotated[int, Field(ge=1)] | None = None,
                    lam: Annotated[float, Field(ge=0)] = 0.0,
                    iterations: Annotated[int, Field(ge=1)] = 3,
                    scale: Literal["median_norm", "none"] = "median_norm") -> Aggregator:
    """Flag aggregator (Almasi et al., 2024; see the module docstring). `subspace_dim` m
    defaults to K // 2 (the paper's runs use m close to K/2).

    FA works on unit vectors, so its output carries no scale of the updates. `scale="none"`
    returns the paper's (1/m) Y Y^T sum_i x_i as is. `"median_norm"` (the default, for use as
    a model delta) returns (1/K) Y Y^T sum_i x_i times the median update norm: K identical
    updates then give back that update."""

    def reduce(u: Updates) -> torch.Tensor:
        x = stack(u, "flag_aggregator")
        k = x.shape[0]
        g = parallel.gram(x)
        m = subspace_dim or max(1, k // 2)
        coeffs = flag_coefficients(g, m, lam, iterations)
        if scale == "none":
            coeffs = coeffs / m
        else:
            coeffs = coeffs / k * g.diagonal().clamp_min(0).sqrt().median()
        return parallel.combine(coeffs, x)

    return stateless(reduce)
