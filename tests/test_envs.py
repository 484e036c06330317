"""The simulation as gymnasium environments: registered ids made from a fresh interpreter
outside the repository, gymnasium's own checker, seeded episodes reproduced bit for bit, and
each action doing what it says against the engine's own runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.backends.runtime import RuntimeOptions
from engine.experiment import run_experiment
from engine.records.logs import read_table
from tests.conftest import ROOT

SCRIPT = """
import json, warnings
import numpy as np
import gymnasium as gym
from gymnasium.utils.env_checker import check_env
warnings.simplefilter("ignore")
out = {}
for name in ("ClientSelection-v0", "Aggregation-v0"):
    env = gym.make(f"engine.envs:concord/{name}", overrides=["rounds=4"])
    check_env(env.unwrapped, skip_render_check=True)
    episodes = []
    for _ in range(2):
        obs, _ = env.reset(seed=5)
        rng = np.random.default_rng(1)
        steps = [obs["clients"].tobytes().hex()]
        for _ in range(4):
            obs, reward, terminated, truncated, info = env.step(
                rng.random(env.action_space.shape).astype(np.float32))
            steps.append([obs["clients"].tobytes().hex(), reward, truncated,
                          info["selected"].tolist()])
        episodes.append(steps)
    other = env.reset(seed=6)[0]["clients"].tobytes().hex()
    out[name] = {"same": episodes[0] == episodes[1], "truncated": episodes[0][-1][2],
                 "other_seed_differs": other != episodes[0][0]}
    env.close()
print(json.dumps(out))
"""


def test_both_environments_pass_check_env_from_outside_the_repository(tmp_path):
    """A fresh interpreter in an empty folder: gym.make by id (the module prefix registers
    them), gymnasium's check_env, two seeded episodes with the same actions, bit for bit."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("ClientSelection-v0", "Aggregation-v0"):
        assert result[name] == {"same": True, "truncated": True, "other_seed_differs": True}


def test_the_selection_action_picks_the_top_k_online_clients():
    import gymnasium as gym

    env = gym.make("engine.envs:concord/ClientSelection-v0", overrides=["rounds=2"])
    obs, _ = env.reset(seed=0)
    n = obs["clients"].shape[0]
    scores = np.random.default_rng(0).random(n).astype(np.float32)
    _, _, _, _, info = env.step(scores)
    online = np.flatnonzero(obs["clients"][:, 2] > 0)
    expected = np.sort(online[np.argsort(-scores[online], kind="stable")[:10]])
    assert info["selected"].tolist() == expected.tolist()
    obs, _, _, truncated, info = env.step(scores)
    assert truncated and info["round"] == 2
    reported = info["selected"]
    assert (obs["clients"][reported, 1] == 0).all()  # staleness: reported this round
    env.close()


def test_reset_without_a_seed_runs_the_scenarios_seed_then_fresh_ones():
    import gymnasium as gym

    env = gym.make("engine.envs:concord/ClientSelection-v0", overrides=["rounds=1"])
    first = env.reset()[0]["clients"]
    again = env.reset()[0]["clients"]
    seeded = env.reset(seed=0)[0]["clients"]  # the default scenario's seed is 0
    assert np.array_equal(first, seeded) and not np.array_equal(first, again)
    env.close()


def test_equal_aggregation_weights_give_the_engines_uniform_weights_run(tmp_path):
    """Aggregation-v0 with every weight equal is the engine's run of the same scenario with
    aggregation [uniform_weights, fedavg]: the same test accuracy, round by round."""
    import gymnasium as gym

    from engine.envs import load_default

    env = gym.make("engine.envs:concord/Aggregation-v0", overrides=["rounds=4"])
    env.reset(seed=0)
    accuracies = [env.step(np.ones(env.action_space.shape, np.float32))[4]["accuracy"]
                  for _ in range(4)]
    env.close()
    cfg = load_default(["rounds=4", "aggregation=[uniform_weights, fedavg]"])
    result = run_experiment(cfg, RuntimeOptions("inline", 1), tmp_path, False)
    rounds = read_table(result.log_dir, "rounds").sort_by("round")
    assert rounds["test_accuracy"].to_pylist() == accuracies


def test_ray_pools_give_the_inline_episode(ray_cluster):
    """backend="ray" (two pool actors) and the default inline pools: the same episode."""
    import gymnasium as gym

    episodes = []
    for kwargs in ({}, {"backend": "ray", "pools": 2}):
        env = gym.make("engine.envs:concord/Aggregation-v0", overrides=["rounds=3"], **kwargs)
        obs, _ = env.reset(seed=2)
        rng = np.random.default_rng(0)
        steps = [env.step(rng.random(env.action_space.shape).astype(np.float32))
                 for _ in range(3)]
        episodes.append([(o["clients"].tobytes(), r, i["accuracy"]) for o, r, _, _, i in steps])
        env.close()
    assert episodes[0] == episodes[1]


def test_a_vector_of_environments_runs_one_process_each():
    """gymnasium's asynchronous vector environment: each copy in its own process, inline."""
    import gymnasium as gym

    envs = gym.make_vec("engine.envs:concord/ClientSelection-v0", num_envs=2,
                        vectorization_mode="async", overrides=["rounds=2"])
    obs, _ = envs.reset(seed=[0, 1])
    assert obs["clients"].shape == (2, 50, 5)
    for _ in range(2):
        obs, rewards, _, truncated, _ = envs.step(envs.action_space.sample())
    assert truncated.all() and rewards.shape == (2,)
    envs.close()


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": ["mode=decentralized"]}, "steps synchronous federated rounds"),
    ({"cost_of": "joules"}, "cost_of: 'bytes' or 'time'"),
    ({"overrides": ["population.num_clients=-1"]}, "population.num_clients"),
])
def test_bad_environment_settings_are_one_line(kwargs, message):
    import gymnasium as gym

    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        gym.make("engine.envs:concord/ClientSelection-v0", **kwargs)


def test_the_default_scenario_is_documented_as_it_is():
    from engine.envs import DEFAULT_SCENARIO

    text = (ROOT / "README.md").read_text()
    assert "50 clients" in text and "Dirichlet(0.3)" in text
    assert DEFAULT_SCENARIO["population"]["num_clients"] == 50
