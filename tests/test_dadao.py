"""DADAO (Nabli & Oyallon, 2023): the pure update functions against an independent float64
numpy simulation of the paper's equations over a fixed event sequence on a strongly convex
quadratic, where the method converges linearly; the clocks' chi_1, chi_2 and rates against
closed forms; the engine's pools against the same simulation."""

from __future__ import annotations

import numpy as np
import torch
from scipy.linalg import expm

from policies import dadao as D
from scenarios import topology
from scenarios.clocks import GOSSIP, dadao_clocks, poisson_events, undirected_edges


def numpy_dadao(x0, events, grad, mu, L, chi1_star, until):  # noqa: N803
    """The paper's dynamics in plain float64 numpy: per node [x, x~, y, y~, z, z~]; the ODE
    between a node's events by scipy's expm; jumps at computation and communication events."""
    nu = mu / 2
    r = np.sqrt(nu / L)
    eta, alpha, alpha_t, theta = r / 8, r / 4, r / 8, 1 / (2 * r)
    gamma, gamma_t, delta, beta, beta_t = 1 / (4 * L), 1 / (4 * np.sqrt(L * nu)), r / 4, \
        0.5, 2 * chi1_star / r
    a = np.array([[-eta, eta, 0, 0, 0, 0], [eta, -eta, 0, 0, 0, 0],
                  [0, 0, -alpha, alpha, 0, 0], [0, -theta * nu, -theta, 0, -theta, 0],
                  [0, 0, 0, 0, -alpha, alpha], [0, 0, 0, 0, alpha_t, -alpha_t]])
    n, p = x0.shape
    s = np.zeros((n, 6, p))
    s[:, 0] = x0
    last = np.zeros(n)

    def advance(i, t):
        s[i] = expm(a * (t - last[i])) @ s[i]
        last[i] = t

    for t, kind, i, j in events:
        if kind == GOSSIP:
            advance(i, t)
            advance(j, t)
            m = (s[i, 2] + s[i, 4]) - (s[j, 2] + s[j, 4])
            s[i, 4] -= beta * m
            s[i, 5] -= beta_t * m
            s[j, 4] += beta * m
            s[j, 5] += beta_t * m
        else:
            advance(i, t)
            g = grad(i, s[i, 0]) - nu * s[i, 0] - s[i, 3]
            s[i, 0] -= gamma * g
            s[i, 1] -= gamma_t * g
            s[i, 3] += (delta + 1.0) * g
    for i in range(n):
        advance(i, until)
    return s


def test_ring_clocks_match_closed_forms():
    """Ring of n: lambda_2(L) = 2 - 2 cos(2 pi / n) and an edge's resistance (n - 1) / n, so
    with L_u = L / n: chi_1 = n / lambda_2, chi_2 = n (n - 1) / (2 n); chi_1* chi_2* = 1/2."""
    n = 8
    c = dadao_clocks(undirected_edges(topology.ring(n)), n)
    assert np.isclose(c.chi1, n / (2 - 2 * np.cos(2 * np.pi / n)))
    assert np.isclose(c.chi2, (n - 1) / 2)
    total = np.sqrt(2 * c.chi1 * c.chi2)
    assert np.isclose(c.edge_rate * n, total)
    assert np.isclose(c.chi1_star * (c.chi2 / total), 0.5)


def quadratic(n=4, p=3, seed=0):
    rng = np.random.default_rng(seed)
    curv = rng.uniform(1.0, 2.0, n)
    target = rng.normal(size=(n, p))
    return curv, target, (curv[:, None] * target).sum(0) / curv.sum()


def test_update_functions_equal_a_numpy_simulation_and_converge():
    """4 nodes on a ring, f_i = a_i / 2 |x - b_i|^2 (mu = min a, L = max a), Poisson clocks
    (rate 1 per node, the paper's uniform edge rates) over 100 units: the pure functions give
    the numpy simulation's state to 1e-9, and every x_i is within 1e-2 of the minimiser of
    sum f_i (from 1 at the start)."""
    n, units = 4, 100.0
    curv, target, star = quadratic(n)
    edges = undirected_edges(topology.ring(n))
    clocks = dadao_clocks(edges, n)
    ev = poisson_events(edges, n, clocks.edge_rate, 1.0, 0.0, units, np.random.default_rng(1))
    events = list(zip(ev.time.tolist(), ev.kind.tolist(), ev.a.tolist(), ev.b.tolist(),
                      strict=True))
    mu, big_l = float(curv.min()), float(curv.max())
    x0 = np.zeros((n, 3))

    def grad(i, x):
        return curv[i] * (x - target[i])

    want = numpy_dadao(x0, events, grad, mu, big_l, clocks.chi1_star, units)

    c = D.constants(D.Dadao(mu, big_l), clocks.chi1_star)
    state, last = D.initial_state(torch.from_numpy(x0)), np.zeros(n)

    def advance(ids, t):
        ids = list(ids)
        state[ids] = D.propagate(state[ids], torch.tensor(t - last[ids]), c)
        last[ids] = t

    for t, kind, i, j in events:
        if kind == GOSSIP:
            advance([i, j], [t, t])
            sent = D.message(state[[i, j]])
            state[[i, j]] = D.comm_jump(state[[i, j]], sent.flip(0), c)
        else:
            advance([i], [t])
            g = torch.from_numpy(grad(i, state[i, D.X].numpy()))[None]
            state[[i]] = D.gradient_jump(state[[i]], g, c)
    advance(range(n), [units] * n)
    np.testing.assert_allclose(state.numpy(), want, rtol=1e-9, atol=1e-9)
    assert np.abs(want[:, 0] - star).max() < 1e-2 * np.abs(star).max()


def softmax_gradient(x, y, w, classes):
    """The mean cross-entropy gradient of a linear model (weight [C, F] then bias [C], as
    torch's Linear flattens) on (x, y), in float64."""
    f = x.shape[1]
    weight, bias = w[: classes * f].reshape(classes, f), w[classes * f:]
    logits = x @ weight.T + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(y.size), y] -= 1.0
    return np.concatenate([(p.T @ x).ravel(), p.sum(axis=0)]) / y.size


def dadao_pools(num_pools: int):
    from engine.backends.runtime import RuntimeOptions, make_pools
    from engine.compute.evaluation import task_evaluator
    from engine.compute.peers import PeerPool, PeerSpec
    from engine.compute.pool import PoolSpec
    from engine.compute.training import EXECUTORS, LocalSGD
    from engine.core.params import init_params
    from engine.resolve import build_task
    from policies.registry import CONSENSUS, build_consensus
    from tests.conftest import small_config

    cfg = small_config(mode="decentralized", population={"num_clients": 8},
                       task={"model": {"kind": "logistic"}})
    task = build_task(cfg)
    params = init_params(task.model.build, 0)
    spec = PoolSpec(task.model, LocalSGD(1, 10_000, 0.05), EXECUTORS["vmap"], cfg.seed)
    policy = build_consensus(CONSENSUS.spec({"dadao": {"mu": 0.05, "L": 2.0}}, "consensus"),
                             False)
    peers = PeerSpec(policy, "shared", np.zeros(0, dtype=np.int64), None,
                     task_evaluator(task, cfg.seed, np.arange(20)), 1.0, 8)
    pools = make_pools(task, spec, RuntimeOptions("inline", num_pools), PeerPool,
                       (peers, params.numpy()))
    return pools, task, params.numpy()


def test_peer_pools_run_dadao_as_the_numpy_simulation_on_any_layout():
    """8 peers on a ring, a linear softmax model on digits with full-batch gradients (batch
    larger than any shard), 2 units of Poisson events run by the pools (levels, cross-pool
    messages, the ODE to each unit's end): 1 pool and 3 pools give the same bits, and the
    models equal the float64 numpy simulation to float32 accuracy."""
    from engine.compute.peers import PeerPool
    from engine.loops.async_gossip import async_unit

    n, units = 8, 2
    edges = undirected_edges(topology.ring(n))
    clocks = dadao_clocks(edges, n)
    unit_events = [poisson_events(edges, n, clocks.edge_rate, 1.0, float(r), float(r + 1),
                                  np.random.default_rng(10 + r)) for r in range(units)]
    results = []
    for num_pools in (1, 3):
        pools, task, x0 = dadao_pools(num_pools)
        for r, ev in enumerate(unit_events):
            async_unit(pools, ev, None, clocks, float(r + 1))
        results.append(np.concatenate(pools.get(pools.map(PeerPool.all_models,
                                                          [()] * pools.num_pools))))
    np.testing.assert_array_equal(results[0], results[1])

    x, y, owner = task.train_rows()
    classes = task.model.num_classes

    def grad(i, w):
        return softmax_gradient(x[owner == i].astype(np.float64), y[owner == i], w, classes)

    events = [e for ev in unit_events for e in zip(ev.time.tolist(), ev.kind.tolist(),
                                                    ev.a.tolist(), ev.b.tolist(), strict=True)]
    want = numpy_dadao(np.tile(x0.astype(np.float64), (n, 1)), events, grad, 0.05, 2.0,
                       clocks.chi1_star, float(units))[:, 0]
    assert np.abs(want - x0).max() > 1e-3  # the models moved
    np.testing.assert_allclose(results[0], want, rtol=1e-4, atol=1e-5)


def test_runs_refuse_unused_settings_and_agree_across_layouts(tmp_path):
    """A run with consensus=dadao refuses what DADAO would not use (sync gossip, a fixed edge
    rate, a learning rate), and its result is the same bits on 1 and 2 pools."""
    import pytest

    from engine.backends.runtime import RuntimeOptions
    from engine.core.errors import ConfigError
    from engine.experiment import run_experiment
    from tests.conftest import small_config

    def cfg(**extra):
        base = {"mode": "decentralized", "rounds": 2, "eval_every": 0,
                "population": {"num_clients": 8}, "topology": {"kind": "ring"},
                "task": {"model": {"kind": "logistic"}}, "training": {"lr": 0.05},
                "consensus": {"dadao": {"mu": 0.05, "L": 2.0}},
                "gossip": {"mode": "async", "eval_peers": 2}}
        return small_config(**{**base, **extra})

    for bad, word in ((dict(gossip={"mode": "sync"}), "gossip.mode"),
                      (dict(gossip={"mode": "async", "asynchronous": {"edge_rate": 2.0}}),
                       "edge_rate"),
                      (dict(training={"lr": 0.1}), "training.lr")):
        with pytest.raises(ConfigError, match=word):
            run_experiment(cfg(**bad), RuntimeOptions("inline", 1), tmp_path, False)
    one, two = (run_experiment(cfg(), RuntimeOptions("inline", k), tmp_path, False)
                .loop.params.numpy() for k in (1, 2))
    np.testing.assert_array_equal(one, two)
    assert np.isfinite(one).all()
