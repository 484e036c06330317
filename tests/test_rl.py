"""Federated reinforcement learning: clients with their own CartPole physics, PPO in the pools,
the mean test return on held-out physics; layout-independent bits, refusals of settings that
do not apply, and the shipped configs as a user runs them (shortened)."""

from __future__ import annotations

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from engine.analysis.summary import load_runs
from engine.backends.runtime import RuntimeOptions
from engine.compute.rl import EnvTrainer
from engine.compute.training import LocalSGD, pin_torch_arithmetic
from engine.core.errors import ConfigError
from engine.core.params import init_params
from engine.experiment import run_experiment
from engine.records.logs import read_table
from engine.resolve import build_task, load
from scenarios.environments import ClientCartPoles, ClientPendulums, EnvTask
from tests.conftest import ROOT

CONFIG = ROOT / "configs" / "fedrl_cartpole.yaml"
SHORT = ["rounds=3", "eval_every=1", "population.num_clients=6",
         "population.participation.clients_per_round=4", "task.cartpole.rollout_steps=64",
         "task.cartpole.test_envs=4", "training.batch_size=32"]


def test_each_client_has_its_own_physics_from_the_seed_tree():
    task = build_task(load(CONFIG))
    assert isinstance(task, EnvTask)
    physics = task.envs.env.physics
    assert set(physics) == {"length", "masspole", "gravity", "force_mag"}
    assert all(v.shape == (20,) and np.unique(v).size == 20 for v in physics.values())
    assert physics["length"].min() >= 0.25 and physics["length"].max() <= 0.75
    again = build_task(load(CONFIG)).envs.env
    assert all(np.array_equal(physics[k], again.physics[k]) for k in physics)
    other = build_task(load(CONFIG, ["seed=1"])).envs.env.physics
    assert not np.array_equal(physics["gravity"], other["gravity"])
    test = task.envs.env.test_physics
    assert test["length"].shape == (16,) and not np.isin(test["length"], physics["length"]).any()
    assert task.model.num_classes == 3  # two actions' logits and the state value


def test_client_cartpoles_step_as_gymnasium_cartpole_does():
    """Against gymnasium's own single CartPole-v1 given the same physics, start state and
    actions: the same states, rewards and terminations, bit for bit."""
    physics = {"length": np.array([0.3, 0.7]), "masspole": np.array([0.05, 0.15]),
               "gravity": np.array([8.0, 11.5]), "force_mag": np.array([12.0, 7.0])}
    vector = ClientCartPoles(physics, [np.random.default_rng(i) for i in range(2)])
    obs, _ = vector.reset()
    actions = np.random.default_rng(0).integers(0, 2, size=(40, 2))
    for i in range(2):
        single = gym.make("CartPole-v1").unwrapped
        single.reset(seed=0)
        single.length, single.masspole = physics["length"][i], physics["masspole"][i]
        single.gravity, single.force_mag = physics["gravity"][i], physics["force_mag"][i]
        single.total_mass = single.masspole + single.masscart
        single.polemass_length = single.masspole * single.length
        single.state = vector.state[:, i].copy()
        mine = ClientCartPoles({k: v[i:i + 1] for k, v in physics.items()},
                               [np.random.default_rng(i)])
        mine.reset()
        mine.state = vector.state[:, i:i + 1].copy()
        for a in actions[:, i]:
            theirs = single.step(int(a))
            ours = mine.step(np.array([a]))
            np.testing.assert_array_equal(ours[0][0], theirs[0])
            assert (ours[1][0], bool(ours[2][0])) == (theirs[1], theirs[2])
            if theirs[2]:
                break


def test_client_pendulums_step_as_gymnasium_pendulum_does():
    """Against gymnasium's Pendulum-v1 (its TimeLimit of 200 included) with the same g, m, l,
    start state and torques: the same observations and rewards, and the truncation."""
    physics = {"gravity": np.array([8.0, 12.0]), "mass": np.array([0.8, 1.2]),
               "length": np.array([1.1, 0.9])}
    vector = ClientPendulums(physics, [np.random.default_rng(i) for i in range(2)])
    vector.reset()
    torques = np.random.default_rng(1).uniform(-3, 3, size=(200, 2, 1)).astype(np.float32)
    for i in range(2):
        single = gym.make("Pendulum-v1")
        single.reset(seed=0)
        inner = single.unwrapped
        inner.g, inner.m, inner.l = (physics[k][i] for k in ("gravity", "mass", "length"))
        inner.state = vector.state[:, i].copy()
        mine = ClientPendulums({k: v[i:i + 1] for k, v in physics.items()},
                               [np.random.default_rng(i)])
        mine.reset()
        mine.state = vector.state[:, i:i + 1].copy()
        for u in torques[:, i]:
            theirs = single.step(u)
            ours = mine.step(u[None])
            np.testing.assert_array_equal(ours[0][0], theirs[0])
            assert ours[1][0] == theirs[1] and bool(ours[3][0]) == theirs[3]
        assert theirs[3]  # truncated at step 200 by both


def test_a_clients_update_does_not_depend_on_who_shares_its_pool():
    """PPO for clients 0..5 at once, and for clients 2 and 5 alone: the same bits."""
    pin_torch_arithmetic()
    task = build_task(load(CONFIG, ["task.cartpole.rollout_steps=64"]))
    trainer = EnvTrainer(task.model, task.shard(0, 6), LocalSGD(2, 32, 1e-3), 0)
    params = init_params(task.model.build, 0)
    together, counts = trainer.local_training(params, np.arange(6), 3)
    assert counts.tolist() == [64] * 6 and together.steps.tolist() == [4] * 6
    for i in (2, 5):
        alone, _ = trainer.local_training(params, np.array([i]), 3)
        assert torch.equal(alone.deltas[0], together.deltas[i])
        assert torch.equal(alone.losses[0], together.losses[i])
    assert not torch.equal(together.deltas[0], together.deltas[1])


PENDULUM = ["task.dataset=pendulum", "task.pendulum.rollout_steps=64",
            "task.pendulum.test_envs=4", "training.batch_size=32"]
RUNS = {
    "fedrl_cartpole": ("fedrl_cartpole", SHORT),
    "gossip_cartpole": ("gossip_cartpole", [*SHORT[:3], *SHORT[4:], "gossip.eval_peers=2"]),
    "fedrl_pendulum": ("fedrl_cartpole", [*SHORT[:4], *PENDULUM]),
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_runs_give_the_same_bits_for_any_layout_on_ray_or_inline(name, tmp_path, ray_cluster):
    config, overrides = RUNS[name]
    cfg = load(ROOT / "configs" / f"{config}.yaml", overrides)
    logged = []
    for layout, options in [("one", RuntimeOptions("inline", 1)),
                            ("three", RuntimeOptions("inline", 3)),
                            ("ray", RuntimeOptions("ray", 2, reuse_actors=True))]:
        result = run_experiment(cfg, options, tmp_path / layout, False)
        rounds = read_table(result.log_dir, "rounds").sort_by("round")
        logged.append((result.loop.params, rounds.select(
            ["train_loss", "test_return", "test_accuracy", "num_updates"]).to_pylist()))
    for params, rows in logged[1:]:
        assert torch.equal(params, logged[0][0]) and rows == logged[0][1]
    returns = [row["test_return"] for row in logged[0][1]]
    assert all(r is not None and (r > 0 if "cartpole" in name else r < 0) for r in returns)
    assert all(row["test_accuracy"] is None for row in logged[0][1])
    if config.startswith("gossip"):
        peers = read_table(tmp_path / "one" / cfg.experiment, "peers").to_pylist()
        assert len(peers) == 2 * 3 and all(p["test_return"] > 0 for p in peers)


def test_the_federated_config_learns_as_a_user_runs_it(tmp_path):
    """`python run.py configs/fedrl_cartpole.yaml` cut to 20 rounds: the held-out return rises
    several-fold from the initial policy's (about 10), the summary names it, analyze reads
    it and `--plot test_return:round` draws it."""
    done = subprocess.run([sys.executable, "run.py", str(CONFIG), "rounds=20", "eval_every=2",
                           "--backend", "inline", "--no-progress", "--log-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test return: final" in done.stdout
    rounds = read_table(tmp_path / "fedrl_cartpole", "rounds").sort_by("round")
    returns = [r for r in rounds["test_return"].to_pylist() if r is not None]
    assert returns[0] < 40 and max(returns) > 100, returns
    summary = load_runs(tmp_path / "fedrl_cartpole").summary
    assert summary["best_return"].to_pylist() == [max(returns)]
    plotted = subprocess.run([sys.executable, str(ROOT / "run.py"), "analyze",
                              str(tmp_path / "fedrl_cartpole"), "--plot", "test_return:round"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert plotted.returncode == 0, plotted.stderr
    assert (tmp_path / "plots" / "test_return_vs_round.png").stat().st_size > 1000


@pytest.mark.parametrize("override, message", [
    ("partition.kind=dirichlet", "partition.kind: task.dataset=cartpole (clients learn by "
                                 "acting) does not use it"),
    ("training.momentum=0.9", "training.momentum: task.dataset=cartpole"),
    ("training.scaffold=true", "training.scaffold: task.dataset=cartpole"),
    ("aggregation=[feddisco, fedavg]", "has no label_counts"),
    ("aggregation=fisher_merge", "has no fisher"),
    ("attack.kind=label_flip", "has no labels to flip"),
    ("population.availability.kind=anarchic", "takes PPO's steps"),
    ("task.cartpole.gravity=[12, 3]", "task.cartpole.gravity: a range [low, high]"),
    ("task.cartpole.nope=1", "dataset 'cartpole' takes no parameter 'nope'"),
])
def test_settings_that_acting_clients_do_not_use_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        load(CONFIG, [override])
