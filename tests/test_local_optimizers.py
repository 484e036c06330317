"""Local optimizers: SAM (FedSAM / DFedSAM) in both executors."""

import numpy as np
import torch

from engine.backends.runtime import RuntimeOptions
from engine.compute.training import EXECUTORS, LocalSGD, batch_plan
from engine.core.params import ParamSpec, init_params
from engine.experiment import run_experiment
from scenarios.models import MODELS, ModelSpec
from tests.conftest import small_config


def _logistic_gradient(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, classes: int):
    """Mean cross-entropy gradient of softmax regression, in closed form (no autograd):
    d/dW = (softmax(xW^T + b) - onehot(y))^T x / B, d/db = column means; flat as [W, b]."""
    f = x.shape[1]
    weight, bias = w[: classes * f].view(classes, f), w[classes * f:]
    err = torch.softmax(x @ weight.T + bias, dim=1) - torch.eye(classes)[y]
    return torch.cat([(err.T @ x / x.shape[0]).reshape(-1), err.mean(dim=0)])


def _tiny():
    spec = ModelSpec(MODELS.make("logistic"), (5,), 3)
    model = spec.build()
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(12, 5)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 12))
    return model, init_params(spec.build, 0), x, y


def test_one_sam_step_matches_a_hand_computation():
    """w1 = w0 - lr grad(w0 + rho g0 / ||g0||), g0 = grad(w0), on the step's batch (global L2
    norm over all parameters), in both executors; rho = 0 is plain SGD."""
    model, w0, x, y = _tiny()
    offsets, counts = np.array([0, 4]), np.array([4, 8])  # client 1 has 2 batches of 4
    hp = LocalSGD(1, 4, 0.3, sam_rho=0.7)
    plan = batch_plan(np.array([5, 6], dtype=np.uint64), offsets, counts, hp)
    expected = []
    for c in range(2):
        w = w0.clone()
        for batch in plan[c]:
            rows = batch[batch >= 0]
            if rows.numel():
                g0 = _logistic_gradient(w, x[rows], y[rows], 3)
                g = _logistic_gradient(w + 0.7 * g0 / g0.norm(), x[rows], y[rows], 3)
                w = w - 0.3 * g
        expected.append(w - w0)
    expected = torch.stack(expected)
    plain = LocalSGD(1, 4, 0.3)
    for name in ("vmap", "loop"):
        run = EXECUTORS[name](model, ParamSpec.of(model))
        out = run(w0, x, y, plan, hp)
        assert out.steps.tolist() == [1, 2]
        assert torch.allclose(out.deltas, expected, atol=1e-6), name
        assert (run(w0, x, y, plan, plain).deltas - expected).abs().max() > 1e-3  # SAM moved it


def _pool(executor, **hp):
    from engine.compute.pool import ClientPool, PoolSpec
    from engine.resolve import build_task

    cfg = small_config()
    task = build_task(cfg)
    spec = PoolSpec(task.model, LocalSGD(2, 8, 0.1, **hp), EXECUTORS[executor], cfg.seed)
    return ClientPool(spec, task.shard(0, 20)), init_params(task.model.build, 0)


def test_vmap_and_loop_agree_with_sam_momentum_prox_and_a_correction():
    """SAM composes with what the step does with its gradient: SCAFFOLD's correction, FedProx,
    momentum, step budgets and padding (unequal clients), the same in both executors."""
    kwargs = dict(sam_rho=0.1, momentum=0.5, prox_mu=0.1, max_steps=5, min_steps=2,
                  scaffold=True)
    (a_pool, params), (b_pool, _) = _pool("vmap", **kwargs), _pool("loop", **kwargs)
    ids = np.array([0, 3, 4, 9, 17])
    fix = 0.05 * torch.randn(ids.size, params.numel(), generator=torch.Generator().manual_seed(1))
    a, _ = a_pool.local_training(params, ids, 3, correction=fix)
    b, _ = b_pool.local_training(params, ids, 3, correction=fix)
    assert len(set(a.steps.tolist())) > 1 and torch.equal(a.steps, b.steps)
    assert (a.deltas - b.deltas).abs().max() <= 1e-5
    assert torch.allclose(a.losses, b.losses, atol=1e-5)
    kwargs.pop("sam_rho")
    c, _ = _pool("vmap", **kwargs)[0].local_training(params, ids, 3, correction=fix)
    assert (c.deltas - a.deltas).abs().max() > 1e-4


def test_dfedsam_gossip_runs_the_same_bits_with_either_layout(tmp_path):
    """DFedSAM-MGS (sam_rho with gossip.steps = 2) in sync gossip: 1 pool and 2 pools, inline,
    give the same global model; SAM changed it."""
    def final(rho, pools):
        cfg = small_config(mode="decentralized", rounds=2, training={"sam_rho": rho},
                           gossip={"steps": 2})
        return run_experiment(cfg, RuntimeOptions("inline", pools), tmp_path, False).loop.params

    one = final(0.05, 1)
    assert torch.equal(one, final(0.05, 2))
    assert (one - final(0.0, 1)).abs().max() > 1e-5
