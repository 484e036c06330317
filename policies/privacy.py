"""Central (user-level) differential privacy: the DP-FedAvg reduction and an RDP accountant.

`dp_gaussian` is the server side of DP-FedAvg (McMahan, Ramage, Talwar & Zhang, 2018,
"Learning Differentially Private Recurrent Language Models"): clip every client's delta to L2
norm S, sum, divide by a fixed denominator (the expected number of clients per round), and add
Gaussian noise with standard deviation z * S / K_expected.

`rdp_epsilon` accounts for T rounds of that sampled Gaussian mechanism with the Rényi DP bound
of Mironov, Talwar & Zhang (2019, "Rényi Differential Privacy of the Sampled Gaussian
Mechanism") at integer orders, converted to (epsilon, delta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, NamedTuple

import numpy as np
import torch
from pydantic import Field
from scipy.special import gammaln

from engine.core import tree
from engine.core.seeds import SeedTree
from engine.core.tree import TreeSums
from engine.core.updates import Updates
from policies.base import Aggregator, stage
from policies.robust import stack

NOISE_STREAM = "dp_gaussian"


class DPState(NamedTuple):
    round: torch.Tensor  # int64 []: aggregations done so far (keys the noise)
    num_params: torch.Tensor  # int64 []: P, for a round without updates


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each row scaled by min(1, max_norm / ||row||_2)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x * torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), 1.0)


def gaussian_noise(seed: int, round_idx: int, num_params: int, std: float) -> torch.Tensor:
    """N(0, std^2 I) [P] float32, keyed by (seed, round) only."""
    if std == 0:
        return torch.zeros(num_params)
    gen = torch.Generator().manual_seed(SeedTree(seed).integer(NOISE_STREAM, round_idx))
    return torch.randn(num_params, generator=gen) * std


@stage("reduction")
def dp_gaussian(noise_multiplier: Annotated[float, Field(ge=0)] = 1.0,
                clip: Annotated[float, Field(gt=0)] = 1.0,
                expected_clients: Annotated[int, Field(ge=1)] | None = None, *,
                seed: int) -> Aggregator:
    """DP-FedAvg's noised fixed-denominator mean (McMahan et al., 2018, "Learning Differentially
    Private Recurrent Language Models", the estimator f_f with uniform client weights):

        step = (sum_k clip(delta_k, S)) / K_exp + N(0, (z * S / K_exp)^2 I)

    with clip(d, S) = d * min(1, S / ||d||_2), S = `clip`, z = `noise_multiplier` and
    K_exp = `expected_clients` (q * N in the paper; None: the round's number of updates, which
    is then no longer a fixed denominator). Adding or removing one client moves the sum by at
    most S, so the mean's sensitivity is S / K_exp and z is the noise multiplier that
    `rdp_epsilon` accounts for. Client weights are not used (each client counts once: user-level
    privacy with w_k = 1). The sum runs over the fixed tree of client ids (order-independent
    bits). The noise is keyed by (seed, aggregation count), the seed drawn by the engine from
    the run's seed tree (another run seed, other noise); with K_exp set, a round with no update
    still gets its noise, as in the paper.

    The accountant's guarantee assumes each client takes part independently with probability
    q (Poisson sampling), as in the paper. Under an asynchronous server (FedAsync, FedBuff,
    FedFix, FedCompass) nobody is sampled: each server step is the plain Gaussian mechanism
    (q = 1) for the clients in it, composed over each client's own steps, and the worst
    client's epsilon is reported (no amplification by sampling is claimed)."""

    def init(params: torch.Tensor) -> DPState:
        return DPState(torch.zeros((), dtype=torch.int64),
                       torch.tensor(params.numel(), dtype=torch.int64))

    def update(updates: Updates, state: DPState) -> tuple[torch.Tensor, DPState]:
        num_params, k = int(state.num_params), updates.num_clients
        next_state = DPState(state.round + 1, state.num_params)
        denominator = expected_clients if expected_clients is not None else k
        if denominator == 0:
            return torch.zeros(num_params), next_state
        if k:
            clipped = clip_rows(stack(updates, "dp_gaussian"), clip)
            total = tree.total(TreeSums.leaves(clipped, updates.client_ids), num_params)
        else:
            total = torch.zeros(num_params)
        std = noise_multiplier * clip / denominator
        noise = gaussian_noise(seed, int(state.round), num_params, std)
        return total / denominator + noise, next_state

    return Aggregator(init, update)


dp_gaussian.noise_parameter = "noise_multiplier"  # a sampled Gaussian mechanism: accounted


# ---------------------------------------------------------------- accountant

DEFAULT_ORDERS: tuple[int, ...] = tuple(range(2, 129)) + (160, 192, 256, 384, 512, 1024)


def _logsumexp(terms: np.ndarray) -> float:
    top = float(terms.max())
    return top + math.log(float(np.exp(terms - top).sum()))


def sampled_gaussian_rdp(noise_multiplier: float, sampling_rate: float, order: int) -> float:
    """RDP of one step of the sampled Gaussian mechanism at integer order alpha >= 2 (Mironov,
    Talwar & Zhang, 2019, Section 3.3): log(A_alpha) / (alpha - 1) with

        A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 s^2)),

    summed in log space. q = 1 is the Gaussian mechanism: alpha / (2 s^2)."""
    sigma, q, alpha = float(noise_multiplier), float(sampling_rate), int(order)
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1:
        return alpha / (2 * sigma**2)
    k = np.arange(alpha + 1, dtype=np.float64)
    log_binomial = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = (log_binomial + k * math.log(q) + (alpha - k) * math.log1p(-q)
             + (k * k - k) / (2 * sigma**2))
    return max(_logsumexp(terms), 0.0) / (alpha - 1)


def rdp_to_epsilon(rdp: float, order: int, delta: float, improved: bool = False) -> float:
    """(epsilon, delta) from RDP epsilon `rdp` at order alpha. Standard conversion (Mironov,
    2017, "Rényi Differential Privacy", Proposition 3): rdp + log(1/delta) / (alpha - 1).
    `improved`: Balle et al., 2020, "Hypothesis Testing Interpretations and Renyi Differential
    Privacy", Theorem 21: rdp + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1),
    never larger than the standard one."""
    if improved:
        eps = rdp + math.log1p(-1 / order) - (math.log(delta) + math.log(order)) / (order - 1)
    else:
        eps = rdp + math.log(1 / delta) / (order - 1)
    return max(eps, 0.0)


def rdp_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                orders: Sequence[int] = DEFAULT_ORDERS, improved: bool = False) -> float:
    """The epsilon of `steps` compositions of the sampled Gaussian mechanism (noise multiplier
    sigma, Poisson sampling rate q) at `delta`: RDP adds up over steps (Mironov, 2017), then
    eps = min over the integer `orders` alpha of rdp_to_epsilon(steps * rdp(alpha), alpha, delta)
    (Mironov, Talwar & Zhang, 2019). inf for noise_multiplier 0; 0 for no step or q = 0."""
    if noise_multiplier < 0 or not 0 <= sampling_rate <= 1 or steps < 0 or not 0 < delta < 1:
        raise ValueError(f"rdp_epsilon: need sigma >= 0, 0 <= q <= 1, steps >= 0, 0 < delta < 1; "
                         f"got {noise_multiplier}, {sampling_rate}, {steps}, {delta}")
    if any(int(a) != a or a < 2 for a in orders) or not orders:
        raise ValueError(f"rdp_epsilon: orders must be integers >= 2, got {list(orders)}")
    if steps == 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    return min(rdp_to_epsilon(steps * sampled_gaussian_rdp(noise_multiplier, sampling_rate, a),
                              int(a), delta, improved)
               for a in orders)
