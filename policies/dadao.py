"""DADAO: Decoupled Accelerated Decentralized Asynchronous Optimization (Nabli & Oyallon,
ICML 2023, arXiv 2208.00779), as pure functions of an explicit per-node state.

Each node i holds six vectors, stacked as state[i] = [x, x~, y, y~, z, z~] ([6, P]): x is the
primal (the node's model), y~ tracks grad f_i(x) - nu x (the dual of F - nu/2 |x|^2, nu =
mu / 2), z and z~ are the gossip (consensus-constraint) variables, and x~, y are the
"tilde"/momentum companions that give the acceleration. Three things change them:

- between events, the linear ODE d state / dt = A state, per node and per coordinate, solved
  exactly over the elapsed time: state(t) = expm(A (t - T_i)) state(T_i) (`propagate`);
  dx = eta (x~ - x), dx~ = eta (x - x~), dy = alpha (y~ - y),
  dy~ = -theta (nu x~ + y + z), dz = alpha (z~ - z), dz~ = alpha~ (z - z~);
- at an event of node i's computation clock (rate 1), with g = grad f_i(x) - nu x - y~:
  x -= gamma g, x~ -= gamma~ g, y~ += (delta + delta~) g (`gradient_jump`);
- at an event of edge (i, j)'s clock (rate lambda_ij), with m = (y_i + z_i) - (y_j + z_j):
  z_i -= beta m, z~_i -= beta~ m, and the opposite at j (`comm_jump`).

Constants (`constants`): nu = mu / 2; eta = alpha~ = sqrt(nu / L) / 8; alpha = sqrt(nu / L)
/ 4; theta = sqrt(L / nu) / 2; gamma = 1 / (4 L); gamma~ = 1 / (4 sqrt(L nu)); delta =
sqrt(nu / L) / 4; delta~ = 1; beta = 1 / 2; beta~ = 2 chi_1* sqrt(L / nu), where chi_1* is
1 / the smallest positive eigenvalue of the graph Laplacian weighted by the edge rates,
Lambda = sum_ij lambda_ij (e_i - e_j)(e_i - e_j)^T. The paper's uniform rates (no SDP): every
edge the same rate, the total sqrt(2 chi_1 chi_2), with chi_1, chi_2 those of the Laplacian
weighted by the uniform edge probabilities 1 / |E| (chi_2 = the largest effective resistance
(1/2)(e_i - e_j)^T L^+ (e_i - e_j) over the edges), so that chi_1* chi_2* = 1/2, the paper's
condition (scenarios/clocks.py `dadao_clocks`). With a mu-strongly convex, L-smooth f_i the
paper proves linear convergence with O(n sqrt(L / mu) log 1/eps) gradients and
O(n sqrt(chi_1 chi_2) sqrt(L / mu) log 1/eps) communications.

Where this departs from the paper: the update equations and constants were read from the
authors' reference code (AdelNabli/DADAO, `optimizers.py`, its `DADAO_optimizer`) and its
driver (uniform edge rates sqrt(2 chi_1 chi_2) / |E|, computation rate 1 per node), which we
take as the paper's Algorithm 1; the initial state is x = the model, every other variable 0,
as there. The engine runs x in float32 for the gradient (the model's dtype) and keeps the
state in float64. Stochastic gradients are one minibatch of `training.batch_size` (the
paper's SGD variant; full batch when the batch holds a node's whole shard). Nodes also
advance their ODE to each unit boundary of virtual time (to evaluate and log the models);
that is the same flow (expm(A s) expm(A t) = expm(A (s + t))). For neural networks (no
strong convexity) DADAO is a heuristic: mu and L are then tuning knobs, not constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from policies.consensus import Consensus, consensus_policy
from policies.gossip import gossip

X, X_TILDE, Y, Y_TILDE, Z, Z_TILDE = range(6)
VARIABLES = 6


@dataclass(frozen=True)
class Dadao:
    """The method's parameters: f_i's strong convexity mu and smoothness L (the paper's
    inputs; every step size derives from them and the graph)."""

    mu: float
    L: float


@dataclass(frozen=True)
class Constants:
    nu: float
    eta: float
    alpha: float
    alpha_tilde: float
    theta: float
    gamma: float
    gamma_tilde: float
    delta: float
    delta_tilde: float
    beta: float
    beta_tilde: float


def constants(p: Dadao, chi1_star: float) -> Constants:
    """The paper's step sizes for (mu, L) and the rate-weighted Laplacian's chi_1*."""
    nu = p.mu / 2
    r = float(np.sqrt(nu / p.L))
    return Constants(nu=nu, eta=r / 8, alpha=r / 4, alpha_tilde=r / 8, theta=0.5 / r,
                     gamma=1 / (4 * p.L), gamma_tilde=1 / (4 * np.sqrt(p.L * nu)),
                     delta=r / 4, delta_tilde=1.0, beta=0.5, beta_tilde=2 * chi1_star / r)


def ode_matrix(c: Constants) -> torch.Tensor:
    """A [6, 6] (float64): d state / dt = A state between events."""
    a = torch.zeros(VARIABLES, VARIABLES, dtype=torch.float64)
    a[X, X], a[X, X_TILDE] = -c.eta, c.eta
    a[X_TILDE, X], a[X_TILDE, X_TILDE] = c.eta, -c.eta
    a[Y, Y], a[Y, Y_TILDE] = -c.alpha, c.alpha
    a[Y_TILDE, X_TILDE], a[Y_TILDE, Y], a[Y_TILDE, Z] = -c.theta * c.nu, -c.theta, -c.theta
    a[Z, Z], a[Z, Z_TILDE] = -c.alpha, c.alpha
    a[Z_TILDE, Z], a[Z_TILDE, Z_TILDE] = c.alpha_tilde, -c.alpha_tilde
    return a


def propagate(state: torch.Tensor, elapsed: torch.Tensor, c: Constants) -> torch.Tensor:
    """state [k, 6, P] after the ODE ran `elapsed` [k] (float64) units: exactly,
    expm(A elapsed) state."""
    flow = torch.linalg.matrix_exp(ode_matrix(c)[None] * elapsed.double()[:, None, None])
    return torch.einsum("kab,kbp->kap", flow, state)


def gradient_jump(state: torch.Tensor, grad: torch.Tensor, c: Constants) -> torch.Tensor:
    """A computation event at each of k nodes (state [k, 6, P], grad f_i(x_i) [k, P])."""
    g = grad.double() - c.nu * state[:, X] - state[:, Y_TILDE]
    out = state.clone()
    out[:, X] -= c.gamma * g
    out[:, X_TILDE] -= c.gamma_tilde * g
    out[:, Y_TILDE] += (c.delta + c.delta_tilde) * g
    return out


def message(state: torch.Tensor) -> torch.Tensor:
    """What a node sends its partner at a communication event: y + z ([k, P])."""
    return state[:, Y] + state[:, Z]


def comm_jump(state: torch.Tensor, received: torch.Tensor, c: Constants) -> torch.Tensor:
    """One end of a communication event at each of k nodes: z -= beta (m_own - m_partner),
    z~ -= beta~ (m_own - m_partner)."""
    m = message(state) - received.double()
    out = state.clone()
    out[:, Z] -= c.beta * m
    out[:, Z_TILDE] -= c.beta_tilde * m
    return out


def initial_state(models: torch.Tensor) -> torch.Tensor:
    """[n, 6, P]: x = the models, every other variable 0."""
    state = torch.zeros(models.shape[0], VARIABLES, models.shape[1], dtype=torch.float64)
    state[:, X] = models.double()
    return state


@consensus_policy(mean_preserving=False)
def dadao(mu: Annotated[float, Field(gt=0)] = 0.01,
          L: Annotated[float, Field(gt=0)] = 1.0) -> Consensus:  # noqa: N803 (the paper's L)
    """DADAO (Nabli & Oyallon, 2023; this module's docstring): asynchronous gossip only
    (gossip.mode=async) on pairwise edge clocks whose rates it derives from the graph, and a
    computation clock of rate 1 per node; `mu` and `L` are f_i's strong convexity and
    smoothness (set them for the task: the defaults are placeholders). A heuristic for
    non-convex models. Outside DADAO's own loop, `update` is plain averaging (unused)."""
    if mu > L:
        raise ValueError(f"mu: the strong convexity is at most the smoothness L={L} (got {mu})")
    return Consensus(gossip().update, pairwise=True, accelerated=Dadao(mu, L))
