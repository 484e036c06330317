"""The fused MLP executor (engine/compute/training.py FusedMLPExecutor): the vmap executor's
steps by batched matrix products, equal to it to 1e-6, layout-independent, and refused for
models it cannot train."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends.runtime import RuntimeOptions
from engine.compute import training
from engine.compute.training import EXECUTORS, LocalSGD, batch_plan
from engine.core.errors import ConfigError
from engine.core.params import ParamSpec, init_params
from engine.experiment import prepare, run_experiment
from scenarios.models import MODELS, ModelSpec
from tests.conftest import small_config


def ten_clients(kind: str, params: dict, hp: LocalSGD, seed: int):
    """A model on 20 features and 5 classes, ten clients of unequal sizes (padding rows and
    idle steps), their batch plan and starting points (one per client)."""
    spec = ModelSpec(MODELS.make(kind, **params), (20,), 5)
    module, rng = spec.build(), np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(400, 20)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, 400))
    counts = np.array([3, 40, 17, 33, 9, 1, 25, 40, 12, 20])
    plan = batch_plan(np.arange(10, dtype=np.uint64), np.arange(10) * 40, counts, hp)
    start = init_params(spec.build, 0) + 0.1 * torch.randn(10, ParamSpec.of(module).size)
    return module, x, y, plan, start


@pytest.mark.parametrize("model", [("mlp", {"hidden": [128]}), ("mlp", {"hidden": [12, 7]}),
                                   ("logistic", {})])
@pytest.mark.parametrize("hp", [
    LocalSGD(1, 16, 0.05),
    LocalSGD(2, 8, 0.05, momentum=0.9, prox_mu=0.1, sam_rho=0.2),
    LocalSGD(1, 8, 0.05, scaffold=True),
])
def test_fused_steps_equal_the_vmap_executor(model, hp):
    """Unequal client sizes (padding rows and idle steps), starting points per client,
    momentum, FedProx, SAM and SCAFFOLD's correction: deltas, losses and momentum to 1e-6."""
    module, x, y, plan, start = ten_clients(*model, hp, seed=0)
    correction = 0.01 * torch.randn_like(start) if hp.scaffold else None
    outs = [EXECUTORS[name](module, ParamSpec.of(module))(start, x, y, plan, hp, None, correction)
            for name in ("vmap", "fused")]
    for field in ("deltas", "losses", "momentum"):
        a, b = getattr(outs[0], field), getattr(outs[1], field)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert torch.equal(outs[0].steps, outs[1].steps)
    assert not torch.equal(outs[1].deltas, torch.zeros_like(outs[1].deltas))


@pytest.mark.parametrize("hp", [LocalSGD(1, 8, 0.05), LocalSGD(1, 8, 0.05, momentum=0.9)])
def test_a_clients_fused_steps_do_not_depend_on_the_others_in_its_batch(hp, monkeypatch):
    """In-place plain SGD and the shared steps: each client's delta and loss are the same
    bits whether it trains with all ten clients, with a few, or alone, padded to the longest
    plan in its batch or not (pools rely on it), and in blocks of FUSED_BLOCK clients."""
    module, x, y, plan, start = ten_clients("mlp", {"hidden": [12, 7]}, hp, seed=1)
    fused = EXECUTORS["fused"](module, ParamSpec.of(module))
    every = fused(start, x, y, plan, hp)
    for group in ([2, 5, 7], [0], [9, 1]):
        steps = int((plan[group] >= 0).any(dim=2).sum(dim=1).max())  # as a pool plans them
        some = fused(start[group], x, y, plan[group][:, :steps], hp)
        assert torch.equal(some.deltas, every.deltas[group])
        assert torch.equal(some.losses, every.losses[group])
    monkeypatch.setattr(training, "FUSED_BLOCK", 3)  # blocks of 3, 3, 3 and 1 clients
    blocked = fused(start, x, y, plan, hp)
    assert torch.equal(blocked.deltas, every.deltas)
    assert torch.equal(blocked.losses, every.losses)


def test_fused_runs_give_the_same_bits_on_any_layout(tmp_path, ray_cluster):
    """Inline with 1 and 3 pools, Ray with 2 (packed calls, aligned cuts): the same bits."""
    cfg = small_config(rounds=2, training={"executor": "fused"},
                       task={"model": {"kind": "mlp", "mlp": {"hidden": [16]}}})
    a, b, c = (run_experiment(cfg, options, tmp_path, False).loop.params for options in
               (RuntimeOptions("inline", pools=1), RuntimeOptions("inline", pools=3),
                RuntimeOptions("ray", pools=2, reuse_actors=True)))
    assert torch.equal(a, b) and torch.equal(a, c)
    vmap = run_experiment(small_config(rounds=2, task={"model": {"kind": "mlp",
                                                                  "mlp": {"hidden": [16]}}}),
                          RuntimeOptions("inline"), tmp_path, False).loop.params
    torch.testing.assert_close(a, vmap, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", [{"model": {"kind": "cnn"}},
                                  {"model": {"kind": "mlp", "supermask": {"keep": 0.5}}}])
def test_fused_refuses_what_it_cannot_train(task):
    with pytest.raises(ConfigError, match=r"^training.executor: fused takes dense layers"):
        prepare(small_config(training={"executor": "fused"}, task=task))


def test_auto_takes_fused_where_it_can_and_vmap_elsewhere():
    from engine.compute.training import FusedMLPExecutor, VmapExecutor

    for kind, want in (("mlp", FusedMLPExecutor), ("cnn", VmapExecutor)):
        spec = ModelSpec(MODELS.make(kind), (1, 8, 8), 10)
        module = spec.build()
        assert type(EXECUTORS["auto"](module, ParamSpec.of(module))) is want
