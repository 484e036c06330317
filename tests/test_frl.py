"""FRL: the supermask model (edge-popup) and the server's vote over edge rankings."""

import numpy as np
import pytest
import torch

from engine.backends.runtime import RuntimeOptions
from engine.compute.pool import ClientPool, PoolSpec
from engine.compute.training import EXECUTORS, LocalSGD
from engine.core.config import SupermaskConfig
from engine.core.errors import ConfigError
from engine.core.params import init_params
from engine.core.seeds import SeedTree
from engine.core.updates import Updates
from engine.experiment import run_experiment
from engine.protocols.federated import Federated
from engine.resolve import build_task, load, resolve
from policies.frl import frl
from policies.registry import build_aggregator, stage_specs
from scenarios.models import MODELS, ModelSpec
from scenarios.supermask import SupermaskLinear, top_edges_mask
from tests.conftest import ROOT, small_config

SUPERMASK = {"kind": "mlp", "hidden": [32], "supermask": {"keep": 0.5}}


def _updates(deltas: torch.Tensor) -> Updates:
    k = deltas.shape[0]
    return Updates(deltas, torch.ones(k), torch.arange(k), torch.zeros(k),
                   torch.ones(k, dtype=torch.int64))


def _reference_vote(client_scores: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """SPIN-UMass/FRL utils.py, re-derived: Find_rank = argsort of each client's scores,
    FRL_Vote sums argsort(rank) over clients, sorts the sums and writes the sorted initial
    scores in that order. Equal sums go to the lower edge index first (policies/ranks.py's
    rule; FRL's code leaves them to torch.sort): sorting sums * M - index does that."""
    rank = torch.argsort(client_scores, dim=1)
    votes = torch.argsort(rank, dim=1).sum(dim=0)
    m = votes.numel()
    out = torch.empty_like(initial)
    out[torch.argsort(votes * m - torch.arange(m), stable=True)] = initial.sort().values
    return out


# One layer of 4 edges, 3 clients. Global scores g = [0.3, -0.1, 0.2, 0.0], sorted initial
# values [-0.1, 0.0, 0.2, 0.3]. Clients' trained scores and each edge's index in the client's
# ascending sort (FRL's vote: higher = more important):
#   c0 [0.5, 0.1, 0.2, 0.0]  -> indices [3, 1, 2, 0]
#   c1 [0.1, 0.4, 0.3, 0.0]  -> indices [1, 3, 2, 0]
#   c2 [0.2, -0.3, 0.6, 0.1] -> indices [2, 0, 3, 1]
# sums [6, 4, 7, 1]: edge 2 best, then 0, 1, 3, so the new scores give edge 2 the largest
# value 0.3, edge 0 0.2, edge 1 0.0, edge 3 -0.1: [0.2, 0.0, 0.3, -0.1].
GLOBAL = torch.tensor([0.3, -0.1, 0.2, 0.0])
CLIENTS = torch.tensor([[0.5, 0.1, 0.2, 0.0], [0.1, 0.4, 0.3, 0.0], [0.2, -0.3, 0.6, 0.1]])
VOTED = torch.tensor([0.2, 0.0, 0.3, -0.1])


def test_vote_known_values_on_a_hand_worked_layer():
    agg = frl(supermask_layers=(4,))
    state = agg.init(GLOBAL)
    step, (scores, values) = agg.update(_updates(CLIENTS - GLOBAL), state)
    assert torch.allclose(step, VOTED - GLOBAL, atol=1e-7)
    assert torch.equal(scores, GLOBAL + step)  # what the engine's params + step will be
    assert torch.equal(values, torch.tensor([-0.1, 0.0, 0.2, 0.3]))
    assert torch.allclose(_reference_vote(CLIENTS, GLOBAL), VOTED)
    # permuting the clients changes nothing; weights are ignored (one client, one vote)
    again, _ = agg.update(_updates((CLIENTS - GLOBAL)[[2, 0, 1]]), state)
    assert torch.equal(again, step)


def test_vote_is_per_layer_and_matches_the_reference_code():
    g = torch.Generator().manual_seed(3)
    layers = (6, 4, 5)
    params = torch.randn(sum(layers), generator=g)
    deltas = 0.5 * torch.randn(7, sum(layers), generator=g)
    agg = frl(supermask_layers=layers)
    state = agg.init(params)
    for _ in range(2):  # the state threads through rounds: scores stay per-layer permutations
        step, state = agg.update(_updates(deltas), state)
        new, values = state
        lo = 0
        for n in layers:
            clients = (params + deltas)[:, lo:lo + n]
            assert torch.allclose(new[lo:lo + n], _reference_vote(clients, params[lo:lo + n]))
            assert torch.equal(new[lo:lo + n].sort().values, params[lo:lo + n].sort().values)
            lo += n
        params = new


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_mask_keeps_the_top_edges_per_layer(keep):
    """FRL's GetSubnet drops the int((1 - k) n) edges of lowest |score| in each layer."""
    scores = torch.randn(7, 13, generator=torch.Generator().manual_seed(0))
    n = scores.numel()
    mask = top_edges_mask(scores, keep)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert int(mask.sum()) == n - int((1 - keep) * n)
    kept, dropped = scores.abs()[mask == 1], scores.abs()[mask == 0]
    assert dropped.numel() == 0 or kept.min() > dropped.max()
    signed = top_edges_mask(scores, keep, by_magnitude=False)
    assert signed.numel() == n and int(signed.sum()) == n - int((1 - keep) * n)
    assert (signed == 0).sum() == 0 or scores[signed == 1].min() > scores[signed == 0].max()


def test_forward_and_straight_through_gradient_by_hand():
    """Scores [[0.3, -0.1], [0.05, -0.4]], keep 0.5: the two largest |score| (0.3, 0.4) are
    kept, mask [[1, 0], [0, 1]]. Weights [[1, -1], [-1, 1]], x = [2, 3]: out = [1*2, 1*3].
    L = out . [1, -2]: dL/dW_eff = c x^T = [[2, 3], [-4, -6]]; dL/dmask = that * W =
    [[2, -3], [4, -6]]; through |score|: * sign(score) = [[2, 3], [4, 6]]."""
    layer = SupermaskLinear(2, 2, keep=0.5, by_magnitude=True,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.scores.copy_(torch.tensor([[0.3, -0.1], [0.05, -0.4]]))
        layer.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    out = layer(torch.tensor([[2.0, 3.0]]))
    assert torch.equal(out, torch.tensor([[2.0, 3.0]]))
    (out[0] * torch.tensor([1.0, -2.0])).sum().backward()
    assert torch.equal(layer.scores.grad, torch.tensor([[2.0, 3.0], [4.0, 6.0]]))
    layer.by_magnitude = False  # signed scores: keep 0.3 and 0.05; no sign factor
    layer.scores.grad = None
    out = layer(torch.tensor([[2.0, 3.0]]))
    assert torch.equal(out, torch.tensor([[2.0, -2.0]]))
    (out[0] * torch.tensor([1.0, -2.0])).sum().backward()
    assert torch.equal(layer.scores.grad, torch.tensor([[2.0, -3.0], [4.0, -6.0]]))


def test_supermask_model_has_scores_only_and_the_same_weights_everywhere():
    mlp, mask = MODELS.make("mlp", hidden=[16]), SupermaskConfig(keep=0.5)
    spec = ModelSpec(mlp, (64,), 10, mask, weight_seed=5)
    a, b = spec.build(), spec.build()
    assert [n for n, _ in a.named_parameters()] == ["1.scores", "3.scores"]
    assert spec.supermask_layers() == (16 * 64, 10 * 16)
    assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers(), strict=True))
    assert a[1].weight.abs().unique().tolist() == pytest.approx([2 ** 0.5 / 8])
    other = ModelSpec(mlp, (64,), 10, mask, weight_seed=6).build()
    assert not torch.equal(other[1].weight, a[1].weight)
    assert ModelSpec(MODELS.make("mlp"), (64,), 10).supermask_layers() == ()


@pytest.mark.parametrize("model", [SUPERMASK, {"kind": "cnn", "supermask": {"keep": 0.3}}])
def test_vmap_executor_equals_loop_executor_on_a_supermask_model(model):
    """Both executors agree to ~3e-8 here. The top-k mask is a step function, so over longer
    local runs a score within that float noise of a layer's threshold can flip one edge in
    one executor only (measured: 2 of 20 clients after 12-36 steps); 8 steps keep clear."""
    cfg = small_config(task={"model": model})
    task = build_task(cfg)
    params = init_params(task.model.build, 0)
    deltas = []
    for executor in ("vmap", "loop"):
        spec = PoolSpec(task.model, LocalSGD(2, 8, 0.5, 0.9), EXECUTORS[executor], cfg.seed)
        pool = ClientPool(spec, task.shard(0, 20))
        result, _ = pool.local_training(params, np.arange(20), 0, max_steps=8)
        deltas.append(result.deltas)
    assert deltas[0].abs().max() > 1e-3  # the scores did train
    assert (deltas[0] - deltas[1]).abs().max() <= 1e-5


def test_short_frl_run_beats_chance(tmp_path):
    """10 rounds of FRL on digits (10 classes, chance 0.1): measured 0.67 at seed 7."""
    cfg = small_config(rounds=10, eval_every=10, aggregation="frl",
                       task={"model": {**SUPERMASK, "hidden": [128]}},
                       training={"lr": 4.0, "momentum": 0.9})
    loop = run_experiment(cfg, RuntimeOptions("inline"), tmp_path, False).loop
    assert loop.final_accuracy > 0.5  # 5x chance
    scores = init_params(build_task(cfg).model.build,
                         SeedTree(cfg.seed).integer("init"))
    layer = 128 * 64  # the global scores are still a permutation of the initial ones
    assert torch.allclose(loop.params[:layer].sort().values, scores[:layer].sort().values)


def test_frl_config_errors():
    dense = small_config(aggregation="frl")
    with pytest.raises(ConfigError, match=r"^task\.model\.supermask: aggregation frl"):
        Federated(dense, resolve(dense), build_task(dense).model, SeedTree(0))
    with pytest.raises(ConfigError, match="frl.* must be the last one"):
        build_aggregator(stage_specs(["frl", "server_sgd"]))
    with pytest.raises(ConfigError, match=r"aggregation\[0\]\.frl\.supermask_layers: set by "
                                          "the engine"):
        build_aggregator(stage_specs([{"frl": {"supermask_layers": [4]}}]))
    with pytest.raises(ConfigError, match=r"task\.model\.supermask\.keep"):
        load(ROOT / "configs/frl_digits.yaml", ["task.model.supermask.keep=0"])
