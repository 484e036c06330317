"""Update compression and central DP inside real runs: what the pools upload, the bytes the
logs count, and the epsilon the rounds table reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.backends.runtime import RuntimeOptions
from engine.compute.pool import ClientPool, PoolSpec
from engine.compute.training import EXECUTORS, LocalSGD
from engine.core.config import build_config
from engine.core.errors import ConfigError
from engine.core.params import init_params
from engine.experiment import run_experiment
from engine.records.logs import read_table
from engine.resolve import build_task, resolve
from policies.compression import kept_count
from policies.privacy import rdp_epsilon
from tests.conftest import small_config, small_raw

INLINE = RuntimeOptions("inline")
TOPK = {"compression": {"kind": "topk", "ratio": 0.05}}


def test_topk_with_error_feedback_uploads_exactly_k_values_and_keeps_the_rest():
    cfg = small_config(training=TOPK)
    task = build_task(cfg)
    params = init_params(task.model.build, 0)
    spec = PoolSpec(task.model, LocalSGD(1, 8, 0.1), EXECUTORS["vmap"], cfg.seed,
                    resolve(cfg).compressor)
    pool = ClientPool(spec, task.shard(0, 20))
    ids = np.array([1, 4, 7])
    sent = pool.train(params, ids, 0).updates.deltas
    k = kept_count(0.05, params.numel())
    assert (sent != 0).sum(dim=1).tolist() == [k, k, k]
    residual = pool.residuals[ids]
    assert (residual != 0).sum(dim=1).min() > params.numel() // 2  # what was not sent
    assert not (residual * sent).any()  # disjoint supports: e = delta - topk(delta)
    plain = ClientPool(PoolSpec(task.model, LocalSGD(1, 8, 0.1), EXECUTORS["vmap"], cfg.seed),
                       task.shard(0, 20)).train(params, ids, 0).updates.deltas
    np.testing.assert_allclose((sent + residual).numpy(), plain.numpy(), atol=1e-6)


def test_bytes_in_the_logs_are_the_compressed_uploads(tmp_path):
    result = run_experiment(small_config(training=TOPK), INLINE, tmp_path, False)
    size = result.loop.params.numel()
    k = kept_count(0.05, size)
    clients = read_table(result.log_dir, "clients")
    assert set(clients["bytes_up"].to_pylist()) == {8 * k}
    rounds = read_table(result.log_dir, "rounds")
    per_round = 5 * 4 * size + 5 * 8 * k  # 5 clients: the model down, top-k up
    assert rounds["bytes_communicated"].to_pylist() == [per_round] * 3


def test_compressed_gossip_runs_asynchronously_and_refuses_push_sum(tmp_path):
    """CHOCO-SGD on Poisson wake-ups: a woken peer sends its compressed difference to its
    neighbours only, so a unit's bytes are far below uncompressed gossip's. Push-sum's
    masses are not compressed copies: refused."""
    raw = small_raw(mode="decentralized", training=TOPK, population={"num_clients": 8},
                    gossip={"mode": "async"})
    raw["population"].pop("participation", None)
    compressed = run_experiment(build_config(raw), INLINE, tmp_path / "a", False)
    raw["training"].pop("compression")
    plain = run_experiment(build_config(raw), INLINE, tmp_path / "b", False)
    sent = [read_table(r.log_dir, "rounds").sort_by("round")["bytes_communicated"].to_numpy()
            for r in (compressed, plain)]
    assert np.all(sent[0] < 0.2 * sent[1])
    assert np.isfinite(compressed.loop.params.numpy()).all()
    raw["training"]["compression"] = TOPK["compression"]
    raw["gossip"]["mode"], raw["consensus"] = "sync", "push_sum"
    raw["gossip"]["mixing"] = "push_sum"
    with pytest.raises(ConfigError, match="training.compression with consensus=push_sum"):
        run_experiment(build_config(raw), INLINE)


def test_dp_epsilon_per_round_matches_an_independent_accounting(tmp_path):
    cfg = small_config(rounds=4, aggregation={"dp_gaussian": {"noise_multiplier": 1.5,
                                                              "clip": 0.5}},
                       server={"dp_delta": 1e-4})
    result = run_experiment(cfg, INLINE, tmp_path, False)
    rounds = read_table(result.log_dir, "rounds").sort_by("round")
    expected = [rdp_epsilon(1.5, 5 / 20, r, 1e-4) for r in (1, 2, 3, 4)]
    np.testing.assert_allclose(rounds["dp_epsilon"].to_numpy(), expected, rtol=1e-9)
    assert expected[0] < expected[-1] < math.inf
    plain = run_experiment(small_config(rounds=1), INLINE, tmp_path / "plain", False)
    assert read_table(plain.log_dir, "rounds")["dp_epsilon"].to_pylist() == [None]
