"""Local optimizers: SAM (FedSAM / DFedSAM) in both executors."""

import numpy as np
import torch

from engine.backends.runtime import RuntimeOptions
from engine.compute.training import EXECUTORS, LocalSGD, batch_plan
from engine.core.params import ParamSpec, init_params
from engine.experiment import run_experiment
from scenarios.models import MODELS, ModelSpec
from tests.conftest import ROOT, small_config


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


# ---------------------------------------------------------------- SCALLION / SCAFCOM

def _controlled_pool(compression="none", uplink=None, **params):
    from engine.compute.pool import ClientPool, PoolSpec
    from engine.resolve import build_task
    from policies.compression import COMPRESSORS

    cfg = small_config()
    task = build_task(cfg)
    spec = PoolSpec(task.model, LocalSGD(2, 8, 0.1, scaffold=True), EXECUTORS["vmap"], cfg.seed,
                    COMPRESSORS.make(compression, **params), uplink=uplink)
    return ClientPool(spec, task.shard(0, 20)), init_params(task.model.build, 0)


def _local_drift(pool, params, ids, r, c):
    """SCAFFOLD option II's change of c_i, recomputed from the pool's own local training:
    -c + (x - y_i) / (K_i lr)."""
    local = torch.from_numpy(ids)
    out, _ = pool.local_training(params, ids, r, correction=c[None, :] - pool.controls[local])
    return -c[None, :] - out.deltas / (out.steps.float()[:, None] * 0.1)


def test_scallion_with_the_identity_compressor_is_scaffold():
    """alpha = 1 and no compression: the one-vector uplink decodes to SCAFFOLD's delta and
    moves c_i as option II does (up to float rounding), over two rounds with c != 0."""
    from engine.core import tree
    from policies.compression import ControlledUplink

    (plain, params), (scallion, _) = _controlled_pool(), _controlled_pool(
        uplink=ControlledUplink())
    ids = np.array([2, 5, 11, 14])
    c = torch.zeros(params.numel())
    for r in range(2):
        a, b = plain.train(params, ids, r, control=c.numpy()), scallion.train(
            params, ids, r, control=c.numpy())
        assert torch.allclose(a.updates.deltas, b.updates.deltas, atol=1e-6)
        every = torch.arange(plain.controls.slot.numel())
        assert torch.allclose(plain.controls[every], scallion.controls[every], atol=1e-5)
        total = tree.total(b.control_sums, params.numel())
        assert torch.allclose(tree.total(a.control_sums, params.numel()), total, atol=1e-5)
        c = c + total / 20
    assert c.abs().max() > 1e-3


def test_scallion_round_by_hand():
    """qsgd, alpha = 0.5: d_i = C(g_i - c_i) with the pool's compression keys,
    c_i += 0.5 d_i, and the server decodes the delta -K_i lr (c + d_i)."""
    from policies.compression import ControlledUplink, qsgd

    pool, params = _controlled_pool("qsgd", ControlledUplink(alpha=0.5), levels=4)
    ids = np.array([1, 6, 9])
    c = 0.01 * torch.randn(params.numel(), generator=torch.Generator().manual_seed(2))
    drift = _local_drift(pool, params, ids, 3, c)
    out = pool.train(params, ids, 3, control=c.numpy())
    d = qsgd(4).compress(drift, pool.seeds.client_keys("compress", 3, ids)).values
    steps = out.updates.steps.float()[:, None]
    assert torch.allclose(pool.controls[torch.from_numpy(ids)], 0.5 * d, atol=1e-6)
    assert torch.allclose(out.updates.deltas, -steps * 0.1 * (c + d), atol=1e-6)
    assert (d - drift).abs().max() > 1e-3  # the compressor did something


def test_scafcom_momentum_and_controls_over_two_rounds():
    """topk, beta = 0.5: v_i = 0.5 v_i + 0.5 g_i, d_i = C(v_i - c_i), c_i += d_i, with
    g_i = c_i + (SCAFFOLD's change of c_i); SCAFCOM scales only unbiased compressors."""
    from policies.compression import ControlledUplink, topk

    pool, params = _controlled_pool("topk", ControlledUplink(1.0, 0.5, contract=True),
                                    ratio=0.1)
    ids, rows = np.array([0, 7, 8]), torch.tensor([0, 7, 8])
    v = torch.zeros(ids.size, params.numel())
    control = torch.zeros_like(v)
    c = torch.zeros(params.numel())
    for r in range(2):
        g = control + _local_drift(pool, params, ids, r, c)
        v = 0.5 * v + 0.5 * g
        d = topk(0.1).compress(v - control, pool.seeds.client_keys("compress", r, ids)).values
        control = control + d
        out = pool.train(params, ids, r, control=c.numpy())
        assert torch.allclose(pool.uplink_momentum[rows], v, atol=1e-6)
        assert torch.allclose(pool.controls[rows], control, atol=1e-6)
        steps = out.updates.steps.float()[:, None]
        assert torch.allclose(out.updates.deltas, -steps * 0.1 * (c + d), atol=1e-6)
        c = c + 0.01


def test_scallion_runs_with_the_same_bits_on_any_layout_and_halves_the_upload(tmp_path):
    from engine.records.logs import read_table

    def run(pools, **compression):
        cfg = small_config(rounds=2, experiment=f"c{pools}{len(compression)}",
                           training={"scaffold": True, "compression": compression})
        loop = run_experiment(cfg, RuntimeOptions("inline", pools), tmp_path, False).loop
        up = read_table(tmp_path / cfg.experiment, "clients")["bytes_up"].to_numpy()
        return loop.params, up.max()

    scallion = dict(kind="qsgd", levels=4, controlled="scallion")
    one, up = run(1, **scallion)
    assert torch.equal(one, run(2, **scallion)[0])
    _, scaffold_up = run(1, kind="qsgd", levels=4)  # qsgd delta + the float32 control
    params = one.numel()
    assert scaffold_up - up == 4 * params  # the control's upload is gone


def test_controlled_compression_refuses_what_it_does_not_use():
    import pytest

    from engine.core.errors import ConfigError
    from tests.conftest import ROOT

    def refused(*overrides):
        from engine.resolve import load
        with pytest.raises(ConfigError) as err:
            load(ROOT / "configs" / "papers" / "scallion.yaml", list(overrides))
        return str(err.value)

    assert "training.scaffold: true" in refused("training.scaffold=false")
    assert "SCAFCOM" in refused("training.compression.kind=topk")  # biased: not SCALLION's
    assert "only SCAFCOM" in refused("training.compression.beta=0.5")
    assert "only SCALLION" in refused("training.compression.controlled=scafcom",
                                      "training.compression.beta=0.5",
                                      "training.compression.alpha=0.5")
    assert "needs training.compression.beta" in refused("training.compression.controlled=scafcom")
    assert "keeps no residual" in refused("training.compression.error_feedback=false")
    assert "FedBuff does not use it" in refused("server.mode=fedbuff", "server.buffer=4",
                                                 "population.participation=null")


def test_frozen_features_train_only_the_output_layer_as_softmax_regression_on_them():
    """training.freeze_features: an MLP's hidden layer keeps its initial values and the output
    layer learns as softmax regression on the fixed hidden features (closed-form gradient,
    float64), in both executors; SAM perturbs only the output layer too."""
    spec = ModelSpec(MODELS.make("mlp", hidden=[4]), (5,), 3)
    model, w0 = spec.build(), init_params(spec.build, 0)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(12, 5)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 12))
    features = sum(spec.layer_sizes()[:-2])  # 4 x 5 weights + 4 biases
    assert features == 24
    hidden_w, hidden_b = w0[:20].view(4, 5).double(), w0[20:24].double()
    h = torch.relu(x.double() @ hidden_w.T + hidden_b)
    offsets, counts = np.array([0, 4]), np.array([4, 8])
    for rho in (0.0, 0.7):
        hp = LocalSGD(1, 4, 0.3, sam_rho=rho, frozen=features)
        plan = batch_plan(np.array([5, 6], dtype=np.uint64), offsets, counts, hp)
        expected = []
        for c in range(2):
            w = w0[features:].double().clone()
            for batch in plan[c]:
                rows = batch[batch >= 0]
                if rows.numel():
                    g = _logistic_gradient(w, h[rows], y[rows], 3)
                    if rho:
                        g = _logistic_gradient(w + rho * g / g.norm(), h[rows], y[rows], 3)
                    w = w - 0.3 * g
            expected.append(w - w0[features:].double())
        expected = torch.stack(expected).float()
        for name in ("vmap", "loop"):
            out = EXECUTORS[name](model, ParamSpec.of(model))(w0, x, y, plan, hp)
            assert torch.equal(out.deltas[:, :features], torch.zeros(2, features)), name
            assert torch.allclose(out.deltas[:, features:], expected, atol=1e-6), (name, rho)


def test_freeze_features_runs_and_is_refused_where_nothing_is_shared(tmp_path):
    """A run keeps the hidden layer of the initial model bit for bit and trains the output
    layer; a logistic model (no features) and independently initialised peers are refused,
    and Bristle (which mixes only the output layer) on an MLP needs it."""
    import pytest

    from engine.core.errors import ConfigError
    from engine.experiment import prepare
    from engine.resolve import load

    cfg = small_config(rounds=2, training={"freeze_features": True})
    parts = prepare(cfg)
    hidden = sum(parts.task.model.layer_sizes()[:-2])
    result = run_experiment(cfg, RuntimeOptions("inline", 2), tmp_path, False)
    assert torch.equal(result.loop.params[:hidden], parts.params[:hidden])
    assert not torch.equal(result.loop.params[hidden:], parts.params[hidden:])
    digits, bristle = ROOT / "configs" / "digits.yaml", ROOT / "configs/papers/bristle.yaml"
    for path, overrides, why in [
            (digits, ["training.freeze_features=true", "task.model.kind=logistic"],
             "no feature layers"),
            (digits, ["training.freeze_features=true", "mode=decentralized",
                      "gossip.init=independent"], "independent"),
            (bristle, ["task.model.kind=mlp"], "set training.freeze_features=true")]:
        with pytest.raises(ConfigError, match=why):
            prepare(load(path, overrides))
    prepare(load(bristle, ["task.model.kind=mlp", "training.freeze_features=true"]))
