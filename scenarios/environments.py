"""Environments for federated reinforcement learning: every client owns a gymnasium
classic-control task whose physics are its own.

A client's physics (CartPole: half pole length, pole mass, gravity, force magnitude) are
drawn from the seed tree within configured ranges, once per run; held-out test physics are
drawn the same way from another branch. A pool steps its clients' environments together, as
one gymnasium vector environment (`ClientCartPoles`, a `CartPoleVectorEnv` whose physics are
arrays, one entry per client). The vector environment's own random generator is shared by
its environments, so which clients share a vector would change their episodes; here each
client's start states come from its own generator, keyed by (round, client), so a client's
episodes are the same in any pool layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from pydantic import AfterValidator, Field

from scenarios.models import ModelSpec


@dataclass(frozen=True)
class EnvFamily:
    """A kind of environment: its observation size, its actions (discrete: how many), and how
    to build a vector of them from per-environment physics."""

    name: str
    obs_dim: int
    num_actions: int
    max_steps: int  # an episode's step limit (the environment's truncation)
    physics: dict[str, tuple[float, float]]  # default range of each physical parameter
    make: Callable[[dict[str, np.ndarray], list[np.random.Generator]], ClientCartPoles]


class ClientCartPoles(CartPoleVectorEnv):
    """CartPole-v1, one environment per client, with the client's own physics: `physics`
    maps length (half the pole's length), masspole, gravity and force_mag to one value per
    environment; `rngs` draws each environment's start states (its own generator). Autoreset
    is gymnasium's next-step mode: the step after an episode ends resets that environment
    (its reward is 0 and its action ignored)."""

    def __init__(self, physics: dict[str, np.ndarray], rngs: list[np.random.Generator]) -> None:
        super().__init__(num_envs=len(rngs), max_episode_steps=500)
        for key, values in physics.items():
            setattr(self, key, np.asarray(values, dtype=np.float64))
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length
        self.rngs = rngs

    def _starts(self, envs: np.ndarray) -> np.ndarray:
        return np.stack([self.rngs[i].uniform(-0.05, 0.05, size=4) for i in envs], axis=1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed, options=options)
        self.state = self._starts(np.arange(self.num_envs))
        return self.state.T.astype(np.float32), {}

    def step(self, action):
        restarting = np.flatnonzero(self.prev_done)
        obs, reward, terminated, truncated, info = super().step(action)
        if restarting.size:  # start states from each client's own generator
            self.state[:, restarting] = self._starts(restarting)
            obs = self.state.T.astype(np.float32)
        return obs, reward, terminated, truncated, info


def cartpole() -> EnvFamily:
    """CartPole-v1 (gymnasium's classic control), with per-client physics. Defaults: the
    environment's own values +-50% around length 0.5, masspole 0.1, gravity 9.8, force 10."""
    return EnvFamily("cartpole", obs_dim=4, num_actions=2, max_steps=500,
                     physics={"length": (0.25, 0.75), "masspole": (0.05, 0.15),
                              "gravity": (7.0, 12.0), "force_mag": (7.0, 13.0)},
                     make=ClientCartPoles)


@dataclass(frozen=True)
class EnvSpec:
    """Every client's environment: the family, every client's physics (one array per
    parameter, indexed by client id) and the held-out test physics."""

    family: EnvFamily
    physics: dict[str, np.ndarray]  # [num_clients] each
    test_physics: dict[str, np.ndarray]  # [test_envs] each

    def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[ids] for k, v in self.physics.items()}


@dataclass(frozen=True)
class Environments:
    """What an environment entry of DATASETS draws (instead of samples): the clients' and the
    test environments, and the settings of learning by acting in them (engine/compute/rl.py
    PPO; the epochs, minibatch size and step size are `training`'s)."""

    env: EnvSpec
    rollout_steps: int
    gamma: float
    gae_lambda: float
    clip: float
    value_coef: float
    entropy_coef: float


def _ordered(bounds: list[float]) -> list[float]:
    if not 0 < bounds[0] <= bounds[1]:
        raise ValueError("a range [low, high] with 0 < low <= high")
    return bounds


Range = Annotated[list[float], Field(min_length=2, max_length=2), AfterValidator(_ordered)]


def draw_physics(family: EnvFamily, ranges: dict[str, list[float]], n: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n environments' physics, each parameter uniform over its range (in a fixed order)."""
    physics = {}
    for key in sorted(family.physics):
        lo, hi = ranges.get(key, family.physics[key])  # checked as the config is read
        physics[key] = rng.uniform(lo, hi, size=n)
    return physics


def cartpole_clients(num_clients: int, rng: np.random.Generator,
                     length: Range = (0.25, 0.75), masspole: Range = (0.05, 0.15),
                     gravity: Range = (7.0, 12.0), force_mag: Range = (7.0, 13.0),
                     test_envs: Annotated[int, Field(ge=1, le=10_000)] = 16,
                     rollout_steps: Annotated[int, Field(ge=8, le=1_000_000)] = 256,
                     gamma: Annotated[float, Field(gt=0, le=1)] = 0.99,
                     gae_lambda: Annotated[float, Field(ge=0, le=1)] = 0.95,
                     clip: Annotated[float, Field(gt=0, le=1)] = 0.2,
                     value_coef: Annotated[float, Field(ge=0, le=100)] = 0.5,
                     entropy_coef: Annotated[float, Field(ge=0, le=100)] = 0.01
                     ) -> Environments:
    """CartPole-v1 (gymnasium classic control) for every client, learnt by PPO: each
    client's half pole length, pole mass, gravity and force magnitude uniform over their
    ranges (the environment's own values are 0.5, 0.1, 9.8 and 10); `test_envs` held-out
    environments drawn the same way score the model (mean return, greedy, 500 at most).
    Each client collects `rollout_steps` steps a round; gamma, GAE's lambda, the clip range
    and the loss coefficients are PPO's."""
    family = cartpole()
    ranges = {"length": length, "masspole": masspole, "gravity": gravity,
              "force_mag": force_mag}
    clients = draw_physics(family, ranges, num_clients, rng)
    test = draw_physics(family, ranges, test_envs, rng)
    return Environments(EnvSpec(family, clients, test), rollout_steps, gamma, gae_lambda,
                        clip, value_coef, entropy_coef)


# the DATASETS entries that are environments (scenarios/datasets.py registers them)
ENVIRONMENT_ENTRIES = frozenset({cartpole_clients})


@dataclass(frozen=True)
class EnvShard:
    """A block of clients that learn by acting: sorted ids and their environments."""

    client_ids: np.ndarray  # int64 [n_local]
    envs: Environments  # the whole population's (small: a few floats per client)


@dataclass(frozen=True)
class EnvTask:
    """A federated task whose clients learn by acting: every client's environment, the
    policy model (the actions' logits and a value, one more output), and PPO's settings. Each
    client's "size" is its rollout: the world times `epochs x minibatches` steps on it."""

    envs: Environments
    model: ModelSpec
    num_clients: int

    @property
    def client_sizes(self) -> np.ndarray:
        return np.full(self.num_clients, self.envs.rollout_steps, dtype=np.int64)

    def shard(self, first: int, stop: int) -> EnvShard:
        return EnvShard(np.arange(first, stop, dtype=np.int64), self.envs)
