"""Non-finite numbers: updates with NaN or inf are dropped and logged, a non-finite model ends
the run as `diverged`, and no reduction multiplies 0 by inf."""

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.backends.runtime import RuntimeOptions
from engine.compute.pool import ClientPool, PoolSpec
from engine.compute.training import EXECUTORS, LocalSGD
from engine.core import parallel
from engine.core.errors import Diverged
from engine.core.params import init_params
from engine.experiment import run_experiment
from engine.records.logs import read_table
from engine.resolve import build_task
from tests.conftest import ROOT, small_config

INLINE = RuntimeOptions("inline", 1)


def test_a_pool_drops_a_nonfinite_update_and_sums_the_rest():
    """Client 3's data hold a NaN: its update is dropped, and the pool's partial sums equal
    those of the other clients trained alone."""
    cfg = small_config()
    task = build_task(cfg)
    shard = task.shard(0, 10)
    x = shard.x.copy()
    x[shard.offsets[3]] = np.nan
    spec = PoolSpec(task.model, LocalSGD(1, 8, 0.1), EXECUTORS["vmap"], cfg.seed)
    pool = ClientPool(spec, dataclasses.replace(shard, x=x))
    params = init_params(task.model.build, 0)
    poisoned = pool.train(params, np.array([1, 3, 5]), 1, pre_reduce=True)
    clean = pool.train(params, np.array([1, 5]), 1, pre_reduce=True)
    assert poisoned.nonfinite.tolist() == [3]
    assert poisoned.updates.client_ids.tolist() == [1, 5]
    assert torch.equal(poisoned.updates.weighted_sums.sums, clean.updates.weighted_sums.sums)


def test_nonfinite_attacks_are_dropped_logged_and_the_run_completes(tmp_path):
    """Gaussian attackers with std 3e38 overflow float32 to inf (in a quarter of the
    coordinates): the server drops their updates (status nonfinite, an events row each) and
    FedAvg keeps learning. (With std 1e38 a row now and then stays finite, and FedAvg's
    model then overflows: diverged, the next test.)"""
    cfg = small_config(rounds=10, attack={"kind": "gaussian", "fraction": 0.3, "std": 3e38})
    result = run_experiment(cfg, INLINE, tmp_path, False)
    clients = read_table(tmp_path / "test", "clients")
    statuses = clients["status"].to_pylist()
    byzantine = clients["byzantine"].to_pylist()
    assert "nonfinite" in statuses
    assert all(b for s, b in zip(statuses, byzantine, strict=True) if s == "nonfinite")
    events = read_table(tmp_path / "test", "events")
    assert events["kind"].to_pylist().count("nonfinite") == statuses.count("nonfinite")
    clean = run_experiment(small_config(rounds=10), INLINE, tmp_path / "clean", False)
    assert clean.loop.final_accuracy > 0.8  # measured 0.866
    assert result.loop.final_accuracy > clean.loop.final_accuracy - 0.15
    outcome = read_table(tmp_path / "test", "outcomes")["status"].to_pylist()
    assert outcome == ["completed"]


def test_an_overflowing_global_model_is_diverged_naming_the_round(tmp_path):
    """Sign flip scaled by 3e38 sends finite updates whose weighted sum overflows: FedAvg's
    model turns inf in round 0, the run stops `diverged`, with round 0's rows kept."""
    attack = {"kind": "sign_flip", "fraction": 0.4, "scale": 3e38}
    cfg = small_config(rounds=5, attack=attack)
    with pytest.raises(Diverged, match="not finite after round 0"):
        run_experiment(cfg, INLINE, tmp_path, False)
    outcomes = read_table(tmp_path / "test", "outcomes")
    assert outcomes["status"].to_pylist() == ["diverged"]
    assert "round 0" in outcomes["error"][0].as_py()
    assert read_table(tmp_path / "test", "rounds")["round"].to_pylist() == [0]
    trimmed = small_config(rounds=5, attack=attack, aggregation={"trimmed_mean": {"trim": 0.45}})
    assert run_experiment(trimmed, INLINE, tmp_path, False).loop.rounds_done == 5


def test_diverged_on_the_command_line_is_one_line_exit_1(tmp_path):
    done = subprocess.run(
        [sys.executable, "run.py", "configs/digits.yaml", "rounds=3", "attack.kind=sign_flip",
         "attack.fraction=0.4", "attack.scale=3e38", "--backend", "inline", "--log-dir",
         str(tmp_path), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert done.stderr.startswith("diverged: the global model is not finite after round 0")


def test_combine_leaves_out_rows_with_zero_coefficients():
    x = torch.tensor([[1.0, 2.0], [math.inf, math.nan], [3.0, 5.0]])
    assert parallel.combine(torch.tensor([0.5, 0.0, 0.5]), x).tolist() == [2.0, 3.5]
    assert parallel.combine(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), x).tolist() == \
        [[1.0, 2.0], [3.0, 5.0]]
