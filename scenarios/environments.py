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
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleVectorEnv
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from pydantic import AfterValidator, Field

from scenarios.models import ModelSpec


@dataclass(frozen=True)
class EnvFamily:
    """A kind of environment: its observation size, its actions (discrete: how many;
    continuous: their size), and how to build a vector of them from per-environment physics
    and start-state generators."""

    name: str
    obs_dim: int
    action_dim: int  # discrete: the number of actions; continuous: the action's size
    continuous: bool
    max_steps: int  # an episode's step limit (the environment's truncation)
    physics: dict[str, tuple[float, float]]  # default range of each physical parameter
    make: Callable[[dict[str, np.ndarray], list[np.random.Generator]], VectorEnv]

    @property
    def policy_outputs(self) -> int:
        """A policy model's outputs: its action head's (the logits; or a mean and a log
        standard deviation per action dimension), then the state value."""
        return (2 * self.action_dim if self.continuous else self.action_dim) + 1


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


class ClientPendulums(VectorEnv):
    """Pendulum-v1 (gymnasium's classic control), one per client, with the client's own
    gravity, mass and length (gymnasium's g, m, l); the step is gymnasium's `PendulumEnv.step` on
    arrays (torque clipped to [-2, 2], speed to [-8, 8], dt 0.05, reward -(theta^2 + 0.1
    theta_dot^2 + 0.001 u^2)); episodes are truncated at 200 steps, as `gym.make` does, with
    the next-step autoreset of CartPoleVectorEnv. Start states (theta in [-pi, pi], theta_dot
    in [-1, 1]) come from each environment's own generator."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}
    max_speed, max_torque, dt, max_episode_steps = 8.0, 2.0, 0.05, 200

    def __init__(self, physics: dict[str, np.ndarray], rngs: list[np.random.Generator]) -> None:
        self.num_envs, self.rngs = len(rngs), rngs
        self.g, self.m, self.length = (np.asarray(physics[k], dtype=np.float64)
                                       for k in ("gravity", "mass", "length"))
        high = np.array([1.0, 1.0, self.max_speed], dtype=np.float32)
        self.single_observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.single_action_space = spaces.Box(-self.max_torque, self.max_torque, (1,),
                                              dtype=np.float32)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.state = np.zeros((2, self.num_envs))
        self.steps = np.zeros(self.num_envs, dtype=np.int32)
        self.prev_done = np.zeros(self.num_envs, dtype=np.bool_)

    def _starts(self, envs: np.ndarray) -> np.ndarray:
        return np.stack([self.rngs[i].uniform(low=[-np.pi, -1.0], high=[np.pi, 1.0])
                         for i in envs], axis=1)

    def _obs(self) -> np.ndarray:
        theta, theta_dot = self.state
        return np.stack([np.cos(theta), np.sin(theta), theta_dot], axis=1).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        self.state = self._starts(np.arange(self.num_envs))
        self.steps[:] = 0
        self.prev_done[:] = False
        return self._obs(), {}

    def step(self, action):
        u = np.clip(np.asarray(action, dtype=np.float32).reshape(self.num_envs),
                    -self.max_torque, self.max_torque)
        th, thdot = self.state
        costs = _angle_normalize(th) ** 2 + 0.1 * thdot ** 2 + 0.001 * (u ** 2)
        g, m, length, dt = self.g, self.m, self.length, self.dt
        newthdot = thdot + (3 * g / (2 * length) * np.sin(th)
                            + 3.0 / (m * length ** 2) * u) * dt
        newthdot = np.clip(newthdot, -self.max_speed, self.max_speed)
        self.state = np.stack([th + newthdot * dt, newthdot])
        self.steps += 1
        reward = (-costs).astype(np.float64)
        terminated = np.zeros(self.num_envs, dtype=np.bool_)
        truncated = self.steps >= self.max_episode_steps
        restarting = np.flatnonzero(self.prev_done)  # the step after an episode's end
        if restarting.size:
            self.state[:, restarting] = self._starts(restarting)
            self.steps[restarting] = 0
            reward[restarting] = 0.0
            truncated[restarting] = False
        self.prev_done = terminated | truncated
        return self._obs(), reward, terminated, truncated, {}


def _angle_normalize(x: np.ndarray) -> np.ndarray:
    return ((x + np.pi) % (2 * np.pi)) - np.pi


def pendulum() -> EnvFamily:
    """Pendulum-v1 (gymnasium's classic control), continuous torque, with per-client physics.
    Defaults: +-25% around the environment's own g 10, m 1, l 1."""
    return EnvFamily("pendulum", obs_dim=3, action_dim=1, continuous=True, max_steps=200,
                     physics={"gravity": (7.5, 12.5), "mass": (0.75, 1.25),
                              "length": (0.75, 1.25)},
                     make=ClientPendulums)


def cartpole() -> EnvFamily:
    """CartPole-v1 (gymnasium's classic control), with per-client physics. Defaults: the
    environment's own values +-50% around length 0.5, masspole 0.1, gravity 9.8, force 10."""
    return EnvFamily("cartpole", obs_dim=4, action_dim=2, continuous=False, max_steps=500,
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


def pendulum_clients(num_clients: int, rng: np.random.Generator,
                     gravity: Range = (7.5, 12.5), mass: Range = (0.75, 1.25),
                     length: Range = (0.75, 1.25),
                     test_envs: Annotated[int, Field(ge=1, le=10_000)] = 16,
                     rollout_steps: Annotated[int, Field(ge=8, le=1_000_000)] = 1024,
                     gamma: Annotated[float, Field(gt=0, le=1)] = 0.9,
                     gae_lambda: Annotated[float, Field(ge=0, le=1)] = 0.95,
                     clip: Annotated[float, Field(gt=0, le=1)] = 0.2,
                     value_coef: Annotated[float, Field(ge=0, le=100)] = 0.5,
                     entropy_coef: Annotated[float, Field(ge=0, le=100)] = 0.0
                     ) -> Environments:
    """Pendulum-v1 (gymnasium classic control, continuous torque) for every client, learnt
    by PPO with a Gaussian policy: each client's gravity, mass and length uniform over their
    ranges (the environment's own g, m, l are 10, 1 and 1); `test_envs` held-out
    environments score the model (mean return of the mean action over 200 steps)."""
    family = pendulum()
    ranges = {"gravity": gravity, "mass": mass, "length": length}
    clients = draw_physics(family, ranges, num_clients, rng)
    test = draw_physics(family, ranges, test_envs, rng)
    return Environments(EnvSpec(family, clients, test), rollout_steps, gamma, gae_lambda,
                        clip, value_coef, entropy_coef)


# the DATASETS entries that are environments (scenarios/datasets.py registers them)
ENVIRONMENT_ENTRIES = frozenset({cartpole_clients, pendulum_clients})


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
