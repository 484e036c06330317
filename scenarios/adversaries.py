"""Byzantine clients and peers: who they are (the world decides, seeded) and what they send.

An attack either poisons the Byzantine clients' data before training (label flip), replaces
their updates after training (federated runs), or forges the gossip messages Byzantine peers
send to each honest neighbour (decentralized runs: dissensus). Update attacks are omniscient:
they see every honest update of the round (the strongest threat model the defences' papers
consider). Configs pick an attack
from ATTACKS by name; its parameters are the other keys of the `attack` section.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from engine.core.neighbourhood import Forge, Forged, Neighbourhood
from engine.core.plugins import Registry
from engine.core.updates import Updates
from scenarios.task import FederatedTask

# (deltas [K, P] of the round, Byzantine mask [K], generator) -> the Byzantine rows [B, P]
Corrupt = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Attack:
    corrupt: Corrupt | None = None  # replaces the Byzantine clients' updates (federated)
    poisons_labels: bool = False  # flips the Byzantine clients' training labels
    forge: Forge | None = None  # forges Byzantine peers' gossip messages (decentralized)

    @property
    def inert(self) -> bool:
        """Does nothing (the `none` attack): no Byzantine clients are drawn."""
        return self.corrupt is None and not self.poisons_labels and self.forge is None

    @property
    def for_servers(self) -> bool:
        """Applies where a server aggregates uploads (it forges no gossip messages)."""
        return self.forge is None

    @property
    def for_peers(self) -> bool:
        """Applies between gossip peers (it replaces no uploads to a server)."""
        return self.corrupt is None


def honest_reference(x: torch.Tensor, byzantine: torch.Tensor) -> torch.Tensor:
    """The honest updates of the round (or, with none, what the attackers computed honestly)."""
    return x[~byzantine] if bool((~byzantine).any()) else x[byzantine]


def _repeat(row: torch.Tensor, byzantine: torch.Tensor) -> torch.Tensor:
    return row[None].expand(int(byzantine.sum()), -1).clone()


def none() -> Attack:
    """No attack: every client is honest."""
    return Attack()


def sign_flip(scale: Annotated[float, Field(gt=0)] = 1.0) -> Attack:
    """Sign flipping (Li et al., 2019, "RSA: Byzantine-Robust Stochastic Aggregation Methods
    for Distributed Learning from Heterogeneous Datasets"): send -scale * own update."""
    return Attack(corrupt=lambda x, byz, gen: -scale * x[byz])


def gaussian(std: Annotated[float, Field(gt=0)] = 1.0) -> Attack:
    """Gaussian Byzantine updates (Blanchard et al., 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent"): send N(0, std^2 I)."""
    return Attack(corrupt=lambda x, byz, gen: std * torch.randn(
        int(byz.sum()), x.shape[1], generator=gen))


def label_flip() -> Attack:
    """Label flipping, a data poisoning attack (Tolpegin et al., 2020, "Data Poisoning Attacks
    Against Federated Learning Systems"): Byzantine clients train on label C - 1 - y."""
    return Attack(poisons_labels=True)


def alie_z(n: int, f: int) -> float:
    """z_max of Baruch et al. (2019): s = floor(n/2 + 1) - f supporters needed;
    z = Phi^-1((n - s) / n)."""
    s = n // 2 + 1 - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def alie(z: float | None = None) -> Attack:
    """A Little Is Enough (Baruch et al., 2019, "A Little Is Enough: Circumventing Defenses For
    Distributed Learning"): every Byzantine client sends mu - z * sigma, the coordinate-wise
    mean and standard deviation of the honest updates; z defaults to the paper's z_max."""

    def corrupt(x: torch.Tensor, byz: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ref = honest_reference(x, byz)
        zk = alie_z(x.shape[0], int(byz.sum())) if z is None else z
        std = ref.std(dim=0) if ref.shape[0] > 1 else torch.zeros_like(ref[0])
        return _repeat(ref.mean(dim=0) - zk * std, byz)

    return Attack(corrupt=corrupt)


def ipm(epsilon: Annotated[float, Field(gt=0)] = 0.1) -> Attack:
    """Inner product manipulation (Xie et al., 2020, "Fall of Empires: Breaking Byzantine-
    tolerant SGD by Inner Product Manipulation"): send -epsilon * mean of the honest updates."""
    return Attack(corrupt=lambda x, byz, gen: _repeat(
        -epsilon * honest_reference(x, byz).mean(dim=0), byz))


def min_max_gamma(ref: torch.Tensor, direction: torch.Tensor, steps: int = 60) -> float:
    """The largest gamma with max_i ||mu + gamma p - x_i|| <= max_ij ||x_i - x_j||
    (the feasible gammas form an interval containing 0: bisection on its upper end)."""
    mu = ref.mean(dim=0)
    bound = torch.cdist(ref, ref).max()

    def fits(gamma: float) -> bool:
        return bool(torch.linalg.vector_norm(ref - (mu + gamma * direction), dim=1).max()
                    <= bound)

    lo, hi = 0.0, 1.0
    while fits(hi) and hi < 2.0**40:
        lo, hi = hi, 2 * hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def min_max(perturbation: Literal["std", "unit_vec", "sign"] = "std") -> Attack:
    """AGR-agnostic Min-Max (Shejwalkar & Houmansadr, 2021, "Manipulating the Byzantine:
    Optimizing Model Poisoning Attacks and Defenses for Federated Learning"): send
    mu + gamma * p with p = -std, -mu/||mu|| or -sign(mu), and gamma as large as possible
    while the malicious update stays no farther from any honest one than the honest updates
    are from each other."""

    def corrupt(x: torch.Tensor, byz: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        ref = honest_reference(x, byz)
        mu = ref.mean(dim=0)
        p = {"std": lambda: -(ref.std(dim=0) if ref.shape[0] > 1 else torch.zeros_like(mu)),
             "unit_vec": lambda: -mu / torch.linalg.vector_norm(mu).clamp_min(1e-30),
             "sign": lambda: -torch.sign(mu)}[perturbation]()
        return _repeat(mu + min_max_gamma(ref, p) * p, byz)

    return Attack(corrupt=corrupt)


def dissensus(epsilon: Annotated[float, Field(gt=0)] = 1.5) -> Attack:
    """The dissensus attack on gossip (He, Karimireddy & Jaggi, 2022, "Byzantine-Robust
    Decentralized Learning via ClippedGossip"): every Byzantine neighbour b of an honest peer
    i sends x_i - epsilon * sum_{honest k} W_ik (x_k - x_i) / sum_{Byzantine b'} W_ib', which
    cancels (epsilon = 1) or reverses (epsilon > 1) the pull of i's honest neighbours."""

    def forge(nb: Neighbourhood, byzantine: torch.Tensor) -> Forged | None:
        sender = byzantine[nb.index] & nb.valid  # [n, D] slots holding a Byzantine model
        target = sender.any(dim=1) & ~byzantine[nb.own]
        if not bool(target.any()):
            return None
        own = nb.own_models()
        honest_w = nb.weights * (nb.valid & ~byzantine[nb.index])
        pull = nb.weighted_sum(lambda k: nb.models[nb.index[:, k]] - own, honest_w)
        byz_w = (nb.weights * sender).sum(dim=1, keepdim=True).clamp_min(1e-30)
        message = own - epsilon * pull / byz_w
        rows, slots = torch.nonzero(sender & target[:, None], as_tuple=True)
        return Forged(rows, slots, message[rows])

    return Attack(forge=forge)


ATTACKS: Registry[Attack] = Registry("attack", {
    "none": none, "sign_flip": sign_flip, "gaussian": gaussian, "label_flip": label_flip,
    "alie": alie, "ipm": ipm, "min_max": min_max, "dissensus": dissensus,
})


@dataclass(frozen=True)
class Adversary:
    attack: Attack
    byzantine: np.ndarray  # bool [num_clients]

    def corrupt(self, updates: Updates, gen: torch.Generator) -> tuple[Updates, torch.Tensor]:
        """The round's updates with the Byzantine rows replaced, and the Byzantine mask [K]."""
        deltas, mask = self.corrupt_rows(updates.deltas, updates.client_ids.numpy(), gen)
        return updates._replace(deltas=deltas), mask

    def corrupt_rows(self, deltas: torch.Tensor, clients: np.ndarray,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of `deltas` sent by `clients` (one id per row; ids may repeat), the Byzantine
        ones replaced; and the Byzantine mask."""
        mask = torch.from_numpy(self.byzantine[clients])
        if self.attack.corrupt is None or not bool(mask.any()):
            return deltas, mask
        out = deltas.clone()
        out[mask] = self.attack.corrupt(deltas, mask, gen).to(out.dtype)
        return out, mask

    def poison(self, task: FederatedTask) -> FederatedTask:
        """The task with the Byzantine clients' labels flipped (y -> C - 1 - y, as their
        pools read their rows), if the attack does that."""
        if not self.attack.poisons_labels:
            return task
        return dataclasses.replace(task, flipped=self.byzantine.copy())


def build_adversary(attack: Attack, fraction: float, num_clients: int,
                    rng: np.random.Generator) -> Adversary | None:
    """None without an attack; else exactly round(fraction * N) Byzantine clients (peers)."""
    if attack.inert:
        return None
    byzantine = np.zeros(num_clients, dtype=bool)
    byzantine[rng.choice(num_clients, round(fraction * num_clients), replace=False)] = True
    return Adversary(attack, byzantine)
