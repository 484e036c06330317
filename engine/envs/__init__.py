"""The simulation as gymnasium environments: a learning agent controls federated training.

    import gymnasium as gym
    env = gym.make("engine.envs:concord/ClientSelection-v0")            # registers, then makes
    env = gym.make("engine.envs:concord/Aggregation-v0", config="configs/quickstart.yaml",
                   overrides=["rounds=30"], cost=0.0)

One step is one synchronous federated round of the engine's own loop (engine/loops/
federated.py FederatedRounds: the world plans the round, the pools train, the chain
aggregates), with the agent's action in the place of one decision:
- ClientSelection-v0: a score per client; the round's clients are the K online clients with
  the highest scores (ties: the lower id), in the place of the selection policy;
- Aggregation-v0: a weight per selected client (in id order, the K slots); the updates are
  averaged with those weights (normalised; all zero: equal) in the place of their sample
  counts, then the chain's server step (FedAvg: the mean) applies.

The observation is the population's public state, fixed in shape: per client its last
reported training loss (0 before its first report), its staleness (rounds since it last
reported, or since the start), whether it is online in the coming round, its device speed
(local steps per second) and its sample count; and the last round's test accuracy. The
reward is the round's gain in test accuracy minus `cost` times the round's communication in
MB (or its virtual seconds, with `cost_of="time"`). The episode is truncated at the config's
`rounds`.

Every draw comes from the run's seed tree: `reset(seed=s)` sets the scenario's seed to s,
and the same actions then give the same episode, bit for bit; `reset()` without a seed runs
the scenario's own seed first, then seeds drawn from gymnasium's generator (`np_random`).
The pools run inline by default (one process per environment, so gymnasium's vector
environments of them work); `backend="ray"` runs them on a private Ray cluster. `log_dir`
keeps each episode's Arrow logs.

Registration: gymnasium 1.x no longer loads plugins from the `gymnasium.envs` entry point at
import (0.x did); pyproject.toml still declares it, for those versions, and in 1.x the
"module:id" form above imports this module, which registers both ids, inside `gym.make`.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from engine.backends.runtime import RuntimeOptions, make_pools
from engine.compute.evaluation import task_evaluator
from engine.compute.training import pin_torch_arithmetic
from engine.core.config import apply_override, build_config, parse_override
from engine.core.errors import ConfigError
from engine.core.updates import Updates
from engine.experiment import prepare
from engine.loops.federated import FederatedRounds, FederatedSetup
from engine.loops.skeleton import Timing
from engine.records.logs import RunLogger
from engine.resolve import CATALOG, load, resolve
from policies.base import Aggregator
from policies.selection import Selection

# A small non-IID digits scenario that steps fast: 50 clients with Dirichlet(0.3) label skew,
# 10 a round, one local epoch of a 32-unit MLP, 30 rounds.
DEFAULT_SCENARIO: dict[str, Any] = {
    "experiment": "env", "seed": 0, "rounds": 30, "eval_every": 1,
    "task": {"dataset": "digits", "model": {"kind": "mlp", "hidden": [32]}},
    "partition": {"kind": "dirichlet", "alpha": 0.3},
    "population": {"num_clients": 50, "participation": {"clients_per_round": 10}},
    "training": {"local_epochs": 1, "batch_size": 16, "lr": 0.1},
}
FEATURES = ("last_loss", "staleness", "online", "steps_per_s", "samples")


class FederatedEnv(gym.Env):
    """A federated run stepped round by round (see the module's docstring); the subclasses
    say which decision the action takes."""

    metadata = {"render_modes": []}

    def __init__(self, config: str | Path | None = None, overrides: list[str] | tuple = (),
                 cost: float = 0.0, cost_of: str = "bytes", backend: str = "inline",
                 pools: int = 1, log_dir: str | Path | None = None) -> None:
        if cost_of not in ("bytes", "time"):
            raise ConfigError(f"cost_of: 'bytes' or 'time' (got {cost_of!r})")
        self.cfg = (load(config, list(overrides)) if config is not None else
                    load_default(list(overrides)))
        if self.cfg.mode != "federated" or self.cfg.server.mode != "sync":
            raise ConfigError("the environment steps synchronous federated rounds: mode "
                              "federated, server.mode sync")
        self.cost, self.cost_of = float(cost), cost_of
        self.options = RuntimeOptions(backend, pools)
        self.log_dir = log_dir
        parts = prepare(self.cfg)  # checks the scenario now, not at the first reset
        self.n, self.k = parts.world.num_clients, parts.world.k
        big = float(np.finfo(np.float32).max)
        self.observation_space = spaces.Dict({
            "clients": spaces.Box(0.0, big, (self.n, len(FEATURES)), dtype=np.float32),
            "accuracy": spaces.Box(0.0, 1.0, (1,), dtype=np.float32),
        })
        self._run: _Run | None = None
        self._episodes = 0

    # -- the decision the action takes: subclasses -----------------------------------------

    def _select(self, available: np.ndarray, k: int, losses: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
        return self._run.selection(available, k, losses, rng)

    def _weights(self, updates: Updates) -> torch.Tensor:
        return updates.weights

    # -- gymnasium ---------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        first = self._episodes == 0
        self._episodes += 1
        if self._run is not None:
            self._run.close()
        if seed is None:  # the scenario's own seed first, then seeds from gymnasium's stream
            seed = self.cfg.seed if first else int(self.np_random.integers(2**31 - 1))
        cfg = self.cfg.model_copy(update={"seed": int(seed)})
        self._run = _Run(cfg, self.options, self._select, self._weights, self.log_dir)
        return self._observation(), {"round": 0}

    def step(self, action):
        if self._run is None:
            raise RuntimeError("call reset() before step()")
        self._action = np.asarray(action, dtype=np.float64)
        run = self._run
        accuracy, plan = run.round()
        spent = plan.bytes / 1e6 if self.cost_of == "bytes" else float(plan.duration)
        reward = accuracy - run.previous - self.cost * spent
        run.previous = accuracy
        truncated = run.r >= self.cfg.rounds
        info = {"round": run.r, "accuracy": accuracy, "selected": plan.selected.copy(),
                "bytes": int(plan.bytes), "virtual_time": run.world.clock}
        return self._observation(), float(reward), False, truncated, info

    def _observation(self) -> dict[str, np.ndarray]:
        run = self._run
        losses = np.where(np.isfinite(run.world.losses), run.world.losses, 0.0)
        online = run.world.availability.mask(run.r).astype(np.float64)
        clients = np.stack([losses, run.r - run.last_report, online,
                            1.0 / run.world.devices.step_s, run.sizes], axis=1)
        return {"clients": clients.astype(np.float32),
                "accuracy": np.array([run.previous], dtype=np.float32)}

    def close(self) -> None:
        if self._run is not None:
            self._run.close()
            self._run = None


class ClientSelectionEnv(FederatedEnv):
    """The action scores every client; the round uses the K online clients with the highest
    scores (ties: the lower id)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.action_space = spaces.Box(0.0, 1.0, (self.n,), dtype=np.float32)

    def _select(self, available, k, losses, rng):
        scores = self._action[available]
        order = np.lexsort((available, -scores))
        return np.sort(available[order[:k]])


class AggregationEnv(FederatedEnv):
    """The action weighs the round's K selected clients (in id order); the updates that
    arrive are averaged with their slots' weights instead of their sample counts."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.action_space = spaces.Box(0.0, 1.0, (self.k,), dtype=np.float32)

    def _weights(self, updates: Updates) -> torch.Tensor:
        slots = np.searchsorted(self._run.selected, updates.client_ids.numpy())
        weights = self._action[slots]
        if not weights.sum() > 0:
            weights = np.ones_like(weights)
        return torch.from_numpy(weights.astype(np.float32))


def load_default(overrides: list[str]):
    """The default scenario (DEFAULT_SCENARIO) with dotted overrides, checked."""
    raw = copy.deepcopy(DEFAULT_SCENARIO)
    for item in overrides:
        apply_override(raw, *parse_override(item), CATALOG)
    cfg = build_config(raw)
    resolve(cfg)
    return cfg


class _Run:
    """One episode: the engine's parts for `cfg`, with the environment's selection and
    weights in the places of the selection policy's and the sample counts."""

    def __init__(self, cfg, options: RuntimeOptions, select, weigh, log_dir) -> None:
        pin_torch_arithmetic()
        parts = prepare(cfg)
        self.world, self.sizes = parts.world, parts.task.client_sizes.astype(np.float64)
        self.selection = parts.world.selection.choose
        self.world.selection = Selection(self._chosen(select), parts.world.selection.closes_at_k)
        self._temp = None if log_dir is not None else tempfile.TemporaryDirectory()
        root = Path(log_dir if log_dir is not None else self._temp.name)
        self.logger = RunLogger(root / cfg.experiment, f"seed-{cfg.seed}")
        self.pools = make_pools(parts.task, parts.spec, options)
        evaluator = task_evaluator(parts.task, cfg.seed)
        chain = parts.mode.aggregator
        aggregator = Aggregator(chain.init, lambda updates, state: chain.update(
            updates._replace(weights=weigh(updates)), state), chain.min_updates)
        setup = FederatedSetup(cfg.rounds, 1, parts.seeds, False, parts.world,
                               parts.adversary, cfg.training.scaffold, None, 0)
        self.loop = FederatedRounds(setup, self.pools, aggregator, parts.params, evaluator,
                                    self.logger)
        self.r, self.previous, self.start = 0, 0.0, time.perf_counter()
        self.last_report = np.zeros(self.world.num_clients)
        self.selected = np.zeros(0, dtype=np.int64)

    def _chosen(self, select):
        def choose(available, k, losses, rng):
            self.selected = select(available, k, losses, rng)
            return self.selected

        return choose

    def round(self):
        """Round r of the engine's loop (step, evaluation, its rows logged): the test
        accuracy after it, and its plan."""
        t0 = time.perf_counter()
        done = self.loop.step(self.r, self.r == self.loop.setup.rounds - 1)
        t1 = time.perf_counter()
        scores = self.loop.evaluate(self.r)
        self.loop.record(self.r, done, scores, Timing(t0, t1, time.perf_counter(), self.start))
        plan, _, updates, _ = self.loop.last
        self.last_report[updates.client_ids.numpy()] = self.r + 1
        self.r += 1
        return float(scores.accuracy), plan

    def close(self) -> None:
        self.logger.flush()
        self.pools.close()
        if self._temp is not None:
            self._temp.cleanup()


def register() -> None:
    """Register concord/ClientSelection-v0 and concord/Aggregation-v0 (idempotent)."""
    for name, entry in (("concord/ClientSelection-v0", ClientSelectionEnv),
                        ("concord/Aggregation-v0", AggregationEnv)):
        if name not in gym.envs.registry:
            gym.register(name, entry_point=entry)


register()
