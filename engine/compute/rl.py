"""Local training by acting: PPO on each client's own environment, all of a pool's selected
clients at once.

The policy is the task's model with one extra output: logits over the actions and a state
value (an actor-critic sharing its trunk), so a client's update is one flat parameter delta
like any other and every aggregation rule, attack and consensus applies unchanged.

One round of a client, as CleanRL's `ppo.py` writes PPO (Schulman et al., 2017, with GAE,
Schulman et al., 2016): from the global policy, collect `rollout_steps` steps of its
environment; compute advantages by GAE(gamma, lambda) and normalise them; then `epochs`
passes over the rollout in `minibatches` shuffled minibatches, each an Adam step (fresh
moments every round: clients keep no state) on the clipped surrogate, the value error and an
entropy bonus. The clients of a pool act and learn together: their environments are one
gymnasium vector environment, their policies one `vmap` over their parameter rows.

Every draw (start states, actions, minibatch order) comes from the client's own generators,
keyed by (round, client) from the seed tree, and the arithmetic is pinned (training.py), so
a client's update does not depend on which clients share its pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from engine.compute.shards import ShardIds
from engine.compute.training import LocalSGD, Trained
from engine.core.params import ParamSpec
from engine.core.seeds import SeedTree
from scenarios.environments import EnvFamily, Environments, EnvShard, EnvSpec
from scenarios.models import ModelSpec


@dataclass(frozen=True)
class PPO:
    """PPO's settings: the environment entry's (`task.cartpole.*`), and training's epochs,
    minibatch size (`training.batch_size`) and Adam step size (`training.lr`)."""

    rollout_steps: int = 256
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2.5e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5

    @classmethod
    def of(cls, envs: Environments, hp: LocalSGD) -> PPO:
        return cls(envs.rollout_steps, hp.epochs, hp.batch_size, hp.lr, envs.gamma,
                   envs.gae_lambda, envs.clip, envs.value_coef, envs.entropy_coef)

    @property
    def minibatches(self) -> int:
        return -(-self.rollout_steps // self.batch_size)


@dataclass(frozen=True)
class Rollout:
    obs: torch.Tensor  # [C, T, obs_dim]
    actions: torch.Tensor  # [C, T]
    logp: torch.Tensor  # [C, T] log-probability of the action taken
    advantages: torch.Tensor  # [C, T] normalised per client
    returns: torch.Tensor  # [C, T] advantage + value (the value target)
    mask: torch.Tensor  # [C, T] 1: a real transition; 0: an autoreset step
    episode_return: np.ndarray  # [C] mean return of the episodes finished in the rollout


class Categorical:
    """A policy over `n` discrete actions: its outputs are the actions' logits."""

    def __init__(self, n: int) -> None:
        self.n = self.outputs = n

    def buffer(self, c: int, t: int) -> torch.Tensor:
        return torch.zeros(c, t, dtype=torch.int64)

    def draw(self, out: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """One client's action [1] from its outputs [1, n] (inverse CDF on one uniform)."""
        cdf = torch.cumsum(F.log_softmax(out, dim=1).exp().double(), dim=1)[0]
        return (cdf < rng.random()).sum().clamp(max=self.n - 1)[None]

    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(out, dim=1).gather(1, actions[:, None])[:, 0]

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(out, dim=1)
        return -(log_probs.exp() * log_probs).sum(dim=1)

    def greedy(self, out: torch.Tensor) -> np.ndarray:
        return out.argmax(dim=1).numpy()


class Gaussian:
    """A policy over actions in R^d: its outputs are a mean and a log standard deviation per
    dimension (the latter clamped to [-5, 2]); the environment clips the action to its range."""

    LOG_2PI = float(np.log(2 * np.pi))

    def __init__(self, d: int) -> None:
        self.d, self.outputs = d, 2 * d

    def buffer(self, c: int, t: int) -> torch.Tensor:
        return torch.zeros(c, t, self.d)

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return out[:, :self.d], out[:, self.d:].clamp(-5.0, 2.0)

    def draw(self, out: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        mean, log_std = self._split(out)
        noise = torch.from_numpy(rng.standard_normal(self.d).astype(np.float32))
        return mean + log_std.exp() * noise  # [1, d]

    def log_prob(self, out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean, log_std = self._split(out)
        z = (actions - mean) / log_std.exp()
        return (-0.5 * z * z - log_std - 0.5 * self.LOG_2PI).sum(dim=1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        return (self._split(out)[1] + 0.5 * (1.0 + self.LOG_2PI)).sum(dim=1)

    def greedy(self, out: torch.Tensor) -> np.ndarray:
        return self._split(out)[0].numpy()


def head_of(family: EnvFamily) -> Categorical | Gaussian:
    """How a family's policy turns its outputs into actions."""
    return Gaussian(family.action_dim) if family.continuous else Categorical(family.action_dim)


def policy_forward(model: torch.nn.Module, spec: ParamSpec, outputs: int):
    """(params [P], obs [B, D]) -> (the action head's outputs [B, outputs], value [B])."""
    def forward(flat, obs):
        out = functional_call(model, spec.unflatten(flat), (obs,))
        return out[:, :outputs], out[:, outputs]

    return forward


class EnvTrainer(ShardIds):
    """A shard of clients that learn by acting: each owns an environment with its own physics
    (`EnvSpec`). The same interface as ShardTrainer (pool.py): `local_training` returns each
    client's parameter delta, its training loss (minus the mean return of the episodes it
    finished, so lower is better), and its optimiser steps."""

    def __init__(self, model: ModelSpec, shard: EnvShard, hp: LocalSGD, seed: int) -> None:
        self.env, self.ppo = shard.envs.env, PPO.of(shard.envs, hp)
        self.client_ids = shard.client_ids
        self.seeds = SeedTree(seed)
        self.model = model.build()
        self._classes = model.num_classes
        self.param_spec = ParamSpec.of(self.model)
        self.head = head_of(self.env.family)
        self.forward = policy_forward(self.model, self.param_spec, self.head.outputs)
        # one client at a time while acting, each from its own copy of its parameters: a
        # row of [C, P] starts at an address that depends on its position, and the matmul
        # kernels round differently with the alignment of their operands
        self.act = lambda params, obs: [self.forward(w.clone(), o[None]) for w, o in zip(
            params, obs, strict=True)]
        self.gradient = vmap(grad(self._loss))

    def label_counts(self, client_ids: np.ndarray) -> torch.Tensor:
        """What a pool sends with every update: no labels here (FedDisco is refused)."""
        return torch.zeros(len(client_ids), self._classes, dtype=torch.int64)

    def local_training(self, params: torch.Tensor, client_ids: np.ndarray, round_idx: int,
                       keys: np.ndarray | None = None, max_steps: int | None = None,
                       momentum: torch.Tensor | None = None,
                       correction: torch.Tensor | None = None,
                       budgets: np.ndarray | None = None) -> tuple[Trained, np.ndarray]:
        """One round of PPO for `client_ids` from `params` ([P] shared or [C, P] one row per
        client): a rollout, then at most `max_steps` (or the client's `budgets` entry) of
        its epochs x minibatches Adam steps (an asynchronous server's assigned steps; one
        step per event of asynchronous gossip, each on a fresh rollout). `keys`: the
        clients' draws (default: keyed by round). Returns the deltas and each client's
        number of environment steps (its weight, as a sample count is)."""
        if momentum is not None or correction is not None:
            raise ValueError("PPO clients take no momentum or correction")
        c = len(client_ids)
        start = params.expand(c, -1).clone() if params.dim() == 1 else params.clone()
        if keys is None:
            keys = self.seeds.client_keys("rl", round_idx, client_ids)
        rngs = [np.random.default_rng([int(k), 1]) for k in keys]  # actions, minibatches
        starts = [np.random.default_rng([int(k), 2]) for k in keys]  # start states
        ids = np.asarray(client_ids, dtype=np.int64)
        with torch.no_grad():
            rollout = self.rollout(start, self.env.rows(ids), starts, rngs)
        caps = np.full(c, self.ppo.epochs * self.ppo.minibatches, dtype=np.int64)
        if max_steps is not None:
            caps = np.minimum(caps, max_steps)
        if budgets is not None:
            caps = np.minimum(caps, np.asarray(budgets, dtype=np.int64))
        trained = self.update(start, rollout, rngs, torch.from_numpy(caps))
        counts = np.full(c, self.ppo.rollout_steps, dtype=np.int64)
        losses = torch.from_numpy(-rollout.episode_return)
        return Trained(trained - start, losses, torch.from_numpy(caps)), counts

    def rollout(self, params: torch.Tensor, physics: dict, starts, rngs) -> Rollout:
        """`rollout_steps` steps of every client's environment under its policy."""
        p, t_max = self.ppo, self.ppo.rollout_steps
        envs = self.env.family.make(physics, starts)
        obs_np, _ = envs.reset()
        c = len(rngs)
        obs = torch.zeros(c, t_max + 1, obs_np.shape[1])
        actions = self.head.buffer(c, t_max)
        logp, values, rewards = (torch.zeros(c, t_max + 1) for _ in range(3))
        done, mask = torch.zeros(c, t_max), torch.ones(c, t_max)
        running, finished, count = np.zeros(c), np.zeros(c), np.zeros(c)
        for t in range(t_max + 1):
            obs[:, t] = torch.from_numpy(obs_np)
            outs = self.act(params, obs[:, t])
            values[:, t] = torch.cat([v for _, v in outs])
            if t == t_max:
                break
            # per client: an elementwise log or exp over all clients at once rounds an
            # element differently with its position (vector body or tail)
            drawn = [self.head.draw(out, g) for (out, _), g in zip(outs, rngs, strict=True)]
            logp[:, t] = torch.cat([self.head.log_prob(out, a) for (out, _), a in zip(
                outs, drawn, strict=True)])
            action = torch.cat(drawn)  # [C] or [C, d]
            actions[:, t] = action
            mask[:, t] = torch.from_numpy(~envs.prev_done).float()  # else an autoreset step
            obs_np, reward, terminated, truncated, _ = envs.step(action.numpy())
            rewards[:, t] = torch.from_numpy(reward)
            ended = terminated | truncated
            done[:, t] = torch.from_numpy(ended).float()
            running += reward
            finished += np.where(ended, running, 0.0)
            count += ended
            running = np.where(ended, 0.0, running)
        # GAE: delta_t = r_t + gamma V(s_t+1) (1 - done_t) - V(s_t), backwards
        advantages = torch.zeros(c, t_max)
        gae = torch.zeros(c)
        for t in reversed(range(t_max)):
            live = 1.0 - done[:, t]
            delta = rewards[:, t] + p.gamma * values[:, t + 1] * live - values[:, t]
            gae = delta + p.gamma * p.gae_lambda * live * gae
            advantages[:, t] = gae
        returns = advantages + values[:, :t_max]
        n = mask.sum(dim=1, keepdim=True)
        mean = (advantages * mask).sum(dim=1, keepdim=True) / n
        std = (((advantages - mean) ** 2 * mask).sum(dim=1, keepdim=True) / n).sqrt()
        normalised = (advantages - mean) / (std + 1e-8)
        episode = np.where(count > 0, finished / np.maximum(count, 1), running)
        return Rollout(obs[:, :t_max], actions, logp[:, :t_max], normalised, returns, mask,
                       episode)

    def _loss(self, flat, obs, actions, old_logp, advantages, returns, mask):
        p = self.ppo
        out, value = self.forward(flat, obs)
        ratio = torch.exp(self.head.log_prob(out, actions) - old_logp)
        surrogate = torch.minimum(ratio * advantages,
                                  torch.clamp(ratio, 1 - p.clip, 1 + p.clip) * advantages)
        entropy = self.head.entropy(out)
        per_step = -surrogate + p.value_coef * 0.5 * (value - returns) ** 2 \
            - p.entropy_coef * entropy
        return (per_step * mask).sum() / mask.sum().clamp(min=1.0)

    def update(self, params: torch.Tensor, r: Rollout, rngs,
               caps: torch.Tensor) -> torch.Tensor:
        """`epochs` x `minibatches` Adam steps on every client's own rollout; client c stops
        after caps[c] of them."""
        p = self.ppo
        c, t_max = r.actions.shape[:2]
        size = p.batch_size
        w = params.clone()
        m1, m2 = torch.zeros_like(w), torch.zeros_like(w)
        beta1, beta2, steps = 0.9, 0.999, 0
        rows = torch.arange(c)[:, None]
        for _ in range(p.epochs):
            order = torch.from_numpy(np.stack([g.permutation(t_max) for g in rngs]))
            for b in range(p.minibatches):
                active = (steps < caps)[:, None]
                if not bool(active.any()):
                    return w
                idx = order[:, b * size:(b + 1) * size]
                g = self.gradient(w, r.obs[rows, idx], r.actions[rows, idx], r.logp[rows, idx],
                                  r.advantages[rows, idx], r.returns[rows, idx],
                                  r.mask[rows, idx])
                norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
                g = g * torch.clamp(p.max_grad_norm / (norm + 1e-6), max=1.0)
                steps += 1
                m1 = torch.where(active, beta1 * m1 + (1 - beta1) * g, m1)
                m2 = torch.where(active, beta2 * m2 + (1 - beta2) * g * g, m2)
                m_hat = m1 / (1 - beta1 ** steps)
                v_hat = m2 / (1 - beta2 ** steps)
                w = torch.where(active, w - p.lr * m_hat / (v_hat.sqrt() + 1e-5), w)
        return w


class ReturnEvaluator:
    """The mean return of a policy over held-out environments (the task's test physics),
    acting greedily, one episode each from fixed start states."""

    def __init__(self, model: ModelSpec, env: EnvSpec, seed: int) -> None:
        self.env, self.seed = env, seed
        module = model.build()
        self.head = head_of(env.family)
        self.forward = policy_forward(module, ParamSpec.of(module), self.head.outputs)

    @torch.no_grad()
    def __call__(self, params: torch.Tensor) -> tuple[None, None, float]:
        """(no loss, no accuracy, mean test return) of the policy `params`."""
        n = next(iter(self.env.test_physics.values())).size
        starts = [np.random.default_rng([self.seed, 3, i]) for i in range(n)]
        envs = self.env.family.make(self.env.test_physics, starts)
        obs, _ = envs.reset()
        total, live = np.zeros(n), np.ones(n, dtype=bool)
        while live.any():
            out, _ = self.forward(params, torch.from_numpy(obs))
            obs, reward, terminated, truncated, _ = envs.step(self.head.greedy(out))
            total += np.where(live, reward, 0.0)
            live &= ~(terminated | truncated)
        return None, None, float(total.mean())
