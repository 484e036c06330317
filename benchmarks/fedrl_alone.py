"""Federated vs alone on heterogeneous CartPoles (configs/fedrl_cartpole.yaml).

Federated: the config as shipped (FedAvg over 10 of 20 clients a round, 100 rounds), inline.
Alone: every client trains its own policy from the same initial one, with the same budget it
has in the federation (rounds x clients_per_round / num_clients rounds of its own PPO, each on
a fresh rollout of its own environment), and no aggregation. Both are scored on the same 16
held-out CartPoles (mean greedy return, 500 at most). Prints the federated model's final
return and the clients' alone: mean, std, min and max.

    python benchmarks/fedrl_alone.py [--seeds 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from engine.backends.runtime import RuntimeOptions
from engine.compute.evaluation import task_evaluator
from engine.compute.rl import EnvTrainer
from engine.compute.training import LocalSGD, pin_torch_arithmetic
from engine.core.params import init_params
from engine.core.seeds import SeedTree
from engine.experiment import run_experiment
from engine.resolve import build_task, load

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fedrl_cartpole.yaml"


def alone(cfg) -> np.ndarray:
    """Each client's final held-out return after training by itself."""
    pin_torch_arithmetic()
    task = build_task(cfg)
    n = task.num_clients
    t = cfg.training
    trainer = EnvTrainer(task.model, task.shard(0, n), LocalSGD(t.local_epochs, t.batch_size,
                                                                t.lr), cfg.seed)
    params = init_params(task.model.build, SeedTree(cfg.seed).integer("init"))
    models = params.expand(n, -1).clone()
    rounds = cfg.rounds * cfg.population.participation.clients_per_round // n
    ids = np.arange(n)
    for r in range(rounds):
        out, _ = trainer.local_training(models, ids, r)
        models = models + out.deltas
    score = task_evaluator(task, cfg.seed)
    return np.array([score(models[i])[2] for i in range(n)])


def federated(cfg) -> float:
    with tempfile.TemporaryDirectory() as logs:
        result = run_experiment(cfg, RuntimeOptions("inline", 1), Path(logs), False)
    return result.loop.final_accuracy  # the final test return of an acting task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=1)
    args = p.parse_args()
    for seed in range(args.seeds):
        cfg = load(CONFIG, [f"seed={seed}"])
        fed = federated(cfg)
        solo = alone(cfg)
        print(f"seed {seed}: federated final return {fed:.1f}; alone (same budget, "
              f"{len(solo)} clients): mean {solo.mean():.1f}, std {solo.std(ddof=1):.1f}, "
              f"min {solo.min():.1f}, max {solo.max():.1f}")


if __name__ == "__main__":
    main()
