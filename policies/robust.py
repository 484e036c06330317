"""Byzantine-robust reductions (Updates -> step [P]) over the full [K, P] stack of deltas.

Every rule is written with the chunked kernels of engine/core/parallel.py: coordinate-wise rules
map over column chunks; distance-based rules work on the K x K Gram matrix (summed over column
chunks) and finish with one weighted combination of the rows. Results are therefore the same
bits whether the chunks run serially or as parallel Ray tasks.

`f` is the number of Byzantine clients a rule is built to tolerate; None picks the largest
value the rule's paper allows for the round's K.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from engine.core import parallel
from engine.core.errors import ConfigError
from engine.core.updates import Updates
from policies.base import Aggregator, stage, stateless

Count = Annotated[int, Field(ge=0)] | None


def stack(updates: Updates, rule: str) -> torch.Tensor:
    if updates.deltas is None:
        raise ValueError(f"{rule} needs every client's delta, not partial sums")
    return updates.deltas


def byzantine_count(f: int | None, k: int, rule: str, most: int) -> int:
    """`f`, or `most` (the largest f the rule allows for K updates) when f is None."""
    if f is None:
        return max(most, 0)
    if f > most:
        raise ConfigError(f"{rule}.f: f={f} is too large for K={k} updates "
                          f"(at most {max(most, 0)})")
    return f


def sorted_columns(chunk: torch.Tensor) -> torch.Tensor:
    """[w, K]: row j holds column j of the chunk in ascending order. Sorting contiguous rows
    with NumPy is ~10x faster than torch.sort along dim 0 (measured on [1000, 32768])."""
    return torch.from_numpy(np.sort(chunk.T.contiguous().numpy(), axis=1))


def _median_of_sorted(st: torch.Tensor) -> torch.Tensor:
    """The median of each row of st [w, K] (the mean of the two middle values when K is even)."""
    k = st.shape[1]
    return st[:, k // 2] if k % 2 else (st[:, k // 2 - 1] + st[:, k // 2]) / 2


def _median_rows(chunk: torch.Tensor) -> torch.Tensor:
    return _median_of_sorted(sorted_columns(chunk))


def _trimmed_rows(chunk: torch.Tensor, b: int) -> torch.Tensor:
    st = sorted_columns(chunk)
    return st[:, b : st.shape[1] - b].mean(dim=1)


@stage("reduction", mean_of_one=True)
def coordinate_median() -> Aggregator:
    """Coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates"). Unweighted, as in the paper."""
    return stateless(lambda u: parallel.columnwise(_median_rows, stack(u, "coordinate_median")))


@stage("reduction", mean_of_one=True)
def trimmed_mean(trim: Annotated[float, Field(ge=0, lt=0.5)] = 0.2) -> Aggregator:
    """Coordinate-wise trimmed mean (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates"): per coordinate, drop the floor(trim * K) largest and
    smallest values and average the rest. Unweighted, as in the paper."""

    def reduce(u: Updates) -> torch.Tensor:
        x = stack(u, "trimmed_mean")
        return parallel.columnwise(partial(_trimmed_rows, b=int(trim * x.shape[0])), x)

    return stateless(reduce)


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of squared distances from each update to its K - f - 2 nearest others."""
    k = dist.shape[0]
    others = dist + torch.diag(torch.full((k,), math.inf, dtype=dist.dtype))
    nearest = max(k - f - 2, 1) if k > 1 else 0
    return others.sort(dim=1).values[:, :nearest].sum(dim=1)


def rank(scores: torch.Tensor, client_ids: torch.Tensor) -> torch.Tensor:
    """Positions ordered by score, ties broken by the lower client id (so the order does not
    depend on how the rows are laid out; two mutual nearest neighbours tie exactly)."""
    by_id = torch.argsort(client_ids, stable=True)
    return by_id[torch.argsort(scores[by_id], stable=True)]


def _krum(f: int | None, m: int | None, rule: str) -> Aggregator:
    def reduce(u: Updates) -> torch.Tensor:
        x = stack(u, rule)
        k = x.shape[0]
        fk = byzantine_count(f, k, rule, (k - 3) // 2)
        chosen = k - fk if m is None else min(m, k)
        scores = krum_scores(parallel.squared_distances(parallel.gram(x)), fk)
        selected = rank(scores, u.client_ids)[:chosen]
        coeffs = torch.zeros(k, dtype=torch.float64).index_fill_(0, selected, 1.0 / chosen)
        return parallel.combine(coeffs, x)

    return stateless(reduce)._replace(min_updates=2 * (f or 0) + 3)  # K > 2f + 2


@stage("reduction")
def krum(f: Count = None) -> Aggregator:
    """Krum (Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent"): the update whose K - f - 2 nearest neighbours are closest in squared
    L2 distance. Needs K > 2f + 2; ties go to the lower client id."""
    return _krum(f, 1, "krum")


@stage("reduction")
def multi_krum(f: Count = None, m: Annotated[int, Field(ge=1)] | None = None) -> Aggregator:
    """Multi-Krum (Blanchard et al., 2017): the mean of the m updates with the best Krum
    scores (m = K - f by default)."""
    return _krum(f, m, "multi_krum")


@stage("reduction", mean_of_one=True)
def geometric_median(iterations: Annotated[int, Field(ge=1)] = 8,
                     nu: Annotated[float, Field(gt=0)] = 1e-6) -> Aggregator:
    """Geometric median by the smoothed Weiszfeld algorithm (Pillutla et al., 2022, "Robust
    Aggregation for Federated Learning", RFA): z <- sum_i b_i x_i / sum_i b_i with
    b_i = a_i / max(nu, ||z - x_i||), a_i the client weights, starting at the weighted mean.
    Runs in the span of the updates: distances come from the Gram matrix."""

    def reduce(u: Updates) -> torch.Tensor:
        x = stack(u, "geometric_median")
        g = parallel.gram(x)
        a = u.weights.double()
        a = a / a.sum() if a.sum() > 0 else torch.full_like(a, 1 / a.numel())
        c = a
        for _ in range(iterations):
            gc = g @ c
            dist = (g.diagonal() - 2 * gc + c @ gc).clamp_min(0).sqrt()
            b = a / dist.clamp_min(nu)
            c = b / b.sum()
        return parallel.combine(c, x)

    return stateless(reduce)


@stage("reduction")
def centered_clipping(tau: Annotated[float, Field(gt=0)] = 1.0,
                      iterations: Annotated[int, Field(ge=1)] = 1) -> Aggregator:
    """Centered clipping (Karimireddy et al., 2021, "Learning from History for Byzantine Robust
    Optimization"): starting from the previous round's aggregate v,
    v <- v + (1/K) sum_i (x_i - v) min(1, tau / ||x_i - v||), `iterations` times.
    The state is the previous aggregate (zero before the first round)."""

    def init(params: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.zeros_like(params),)

    def update(u: Updates, state: tuple[torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        x = torch.cat([stack(u, "centered_clipping"), state[0][None]])  # row K is v
        k = x.shape[0] - 1
        g = parallel.gram(x)
        c = torch.zeros(k + 1, dtype=torch.float64)
        c[k] = 1.0  # v as coefficients over the rows of x
        for _ in range(iterations):
            gc = g @ c
            dist = (g.diagonal()[:k] - 2 * gc[:k] + c @ gc).clamp_min(0).sqrt()
            scale = torch.where(dist > tau, tau / dist.clamp_min(1e-300), 1.0)
            c = c * (1 - scale.mean())
            c[:k] += scale / k
        v = parallel.combine(c, x)
        return v, (v,)

    return Aggregator(init, update)


def _closest_to_median(chunk: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column, the mean of the beta values closest to the column's median."""
    ct = chunk.T.contiguous()  # [w, theta]
    gap = (ct - _median_rows(chunk)[:, None]).abs()
    nearest = torch.from_numpy(np.argsort(gap.numpy(), axis=1, kind="stable")[:, :beta])
    return ct.gather(1, nearest).mean(dim=1)


@stage("reduction")
def bulyan(f: Count = None) -> Aggregator:
    """Bulyan (El Mhamdi et al., 2018, "The Hidden Vulnerability of Distributed Learning in
    Byzantium"): select theta = K - 2f updates by Krum, one at a time from those left; then per
    coordinate average the beta = theta - 2f selected values closest to their median.
    Needs K >= 4f + 3."""

    def reduce(u: Updates) -> torch.Tensor:
        x = stack(u, "bulyan")
        k = x.shape[0]
        fk = byzantine_count(f, k, "bulyan", (k - 3) // 4)
        dist = parallel.squared_distances(parallel.gram(x))
        left, chosen = list(range(k)), []
        while len(chosen) < k - 2 * fk:
            idx = torch.tensor(left)
            best = left[int(rank(krum_scores(dist[idx][:, idx], fk), u.client_ids[idx])[0])]
            chosen.append(best)
            left.remove(best)
        subset = x[torch.tensor(sorted(chosen))]
        return parallel.columnwise(partial(_closest_to_median, beta=k - 4 * fk), subset)

    return stateless(reduce)._replace(min_updates=4 * (f or 0) + 3)  # K >= 4f + 3
