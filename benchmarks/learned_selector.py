"""A learned client selector on concord/ClientSelection-v0, against uniform and power-of-choice.

Scenario: the environment's default (engine/envs: 50 digits clients, Dirichlet(0.3) label
skew, 10 a round, 30 rounds). The learned selector is a bandit over scoring rules: each arm
scores the clients from the observation (random; highest last loss; most stale; most samples;
loss and staleness ranks summed; loss times samples), the round takes the top K. UCB1 picks an
arm per training episode (training seeds 100, 101, ...), rewarded by the episode's final test
accuracy; the arm with the best mean is then run on the test seeds. Uniform and power-of-choice
are the engine's own selection policies on the same scenario and seeds (run_experiment).
Prints, per selector, the mean and std over the test seeds of the final accuracy and of the
rounds to the target accuracy (not reached: counted as rounds + 1, and said).

    python benchmarks/learned_selector.py [--episodes 60] [--seeds 5] [--target 0.7]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np

from engine.backends.runtime import RuntimeOptions
from engine.envs import load_default
from engine.experiment import run_experiment
from engine.records.logs import read_table


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)


ARMS: dict[str, Callable[[dict, np.random.Generator], np.ndarray]] = {
    "random": lambda obs, rng: rng.random(obs["clients"].shape[0]),
    "loss": lambda obs, rng: obs["clients"][:, 0] + 1e3 * (obs["clients"][:, 0] == 0),
    "stale": lambda obs, rng: obs["clients"][:, 1],
    "samples": lambda obs, rng: obs["clients"][:, 4],
    "loss+stale": lambda obs, rng: _rank(obs["clients"][:, 0]) + _rank(obs["clients"][:, 1]),
    "loss*samples": lambda obs, rng: (obs["clients"][:, 0] + 1e-3) * obs["clients"][:, 4],
}


def episode(env, arm: str, seed: int) -> list[float]:
    """Test accuracy after each round of one episode selecting by `arm`."""
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    accuracies, truncated = [], False
    while not truncated:
        scores = ARMS[arm](obs, rng)
        scores = (scores - scores.min()) / max(float(np.ptp(scores)), 1e-12)
        obs, _, _, truncated, info = env.step(scores.astype(np.float32))
        accuracies.append(info["accuracy"])
    return accuracies


def train(env, episodes: int) -> tuple[str, dict[str, list[float]]]:
    """UCB1 over the arms, one arm per training episode; the arm with the best mean."""
    rewards: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for t in range(episodes):
        untried = [arm for arm in ARMS if not rewards[arm]]
        arm = untried[0] if untried else max(ARMS, key=lambda a: np.mean(rewards[a]) + math.sqrt(
            2 * math.log(t) / len(rewards[a])))
        rewards[arm].append(episode(env, arm, 100 + t)[-1])
    best = max((a for a in ARMS if rewards[a]), key=lambda a: np.mean(rewards[a]))
    return best, rewards


def engine_run(selection: str, seed: int) -> list[float]:
    cfg = load_default([f"seed={seed}", f"selection.kind={selection}"])
    with tempfile.TemporaryDirectory() as logs:
        run_experiment(cfg, RuntimeOptions("inline", 1), Path(logs), False)
        rounds = read_table(Path(logs) / cfg.experiment, "rounds").sort_by("round")
    return rounds["test_accuracy"].to_pylist()


def to_target(accuracies: list[float], target: float) -> int:
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), len(accuracies) + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target", type=float, default=0.7)
    args = p.parse_args()
    env = gym.make("engine.envs:concord/ClientSelection-v0")
    best, rewards = train(env, args.episodes)
    print(f"UCB1 over {len(ARMS)} scoring rules, {args.episodes} training episodes (seeds 100+):"
          )
    for arm, got in rewards.items():
        print(f"  {arm:<13} {len(got):2d} episodes, mean final accuracy "
              f"{np.mean(got) if got else float('nan'):.4f}")
    curves = {f"learned ({best})": [episode(env, best, s) for s in range(args.seeds)],
              "uniform": [engine_run("uniform", s) for s in range(args.seeds)],
              "power_of_choice": [engine_run("power_of_choice", s) for s in range(args.seeds)]}
    env.close()
    print(f"\ntest seeds 0-{args.seeds - 1}, target accuracy {args.target}:")
    print(f"| selector | final accuracy (mean +- std) | rounds to {args.target} (mean +- std) |")
    print("| --- | --- | --- |")
    for name, runs in curves.items():
        final = np.array([c[-1] for c in runs])
        reach = np.array([to_target(c, args.target) for c in runs])
        missed = int((reach > len(runs[0])).sum())
        note = f" ({missed} not reached)" if missed else ""
        print(f"| {name} | {final.mean():.4f} +- {final.std(ddof=1):.4f} | "
              f"{reach.mean():.1f} +- {reach.std(ddof=1):.1f}{note} |")


if __name__ == "__main__":
    main()
