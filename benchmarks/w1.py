"""W1: the engine (Ray backend, the config's executor: auto) vs in-process plain-PyTorch references.

Workload (configs/w1.yaml): 1000 clients x 64 samples, 64 features, 10 classes; MLP 64-128-10;
100 clients per round; 1 local epoch, batch 16, SGD lr 0.05; FedAvg; 20 rounds in the config,
40 here (`--rounds`). Prints steady-state client-updates/s of both (rounds after the first
`--warmup`) and the ratio.

    python benchmarks/w1.py [--pools N] [--rounds R]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import (  # benchmarks/common.py (the script's folder)
    alternate,
    parser,
    plain_sgd,
    plain_step,
    shuffled,
    stacked,
    steady_rate,
)
from torch.func import functional_call, grad, vmap

from engine.core.config import load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "w1.yaml"


def reference(cfg, warmup: int, formulation: str) -> float:
    """Plain PyTorch: per-client data as one dense tensor, all selected clients stepped together,
    mean of the deltas. Same data, model, selection size and hyper-parameters. `formulation`:
    "vmap_grad" (vmap(grad(loss))) or "vmap_loss" (vmap the loss, one autograd pass, as the
    engine's executor does)."""
    n, per, x, y, _, model, spec, params = stacked(cfg)
    hp, k = cfg.training, cfg.population.participation.clients_per_round

    def loss(flat, xb, yb):
        return F.cross_entropy(functional_call(model, spec.unflatten(flat), (xb,)), yb)

    if formulation == "vmap_grad":
        step = vmap(grad(loss))
    else:
        losses = vmap(loss)

        def step(w, xb, yb):
            w = w.detach().requires_grad_(True)
            return torch.autograd.grad(losses(w, xb, yb).sum(), w)[0]

    rng = np.random.default_rng(0)

    def one_round(r: int) -> int:
        nonlocal params
        chosen = torch.from_numpy(np.sort(rng.choice(n, k, replace=False)))
        xs, ys = shuffled(x[chosen], y[chosen])
        w = params.expand(k, -1).clone()
        for s in range(0, per, hp.batch_size):
            w -= hp.lr * step(w, xs[:, s : s + hp.batch_size], ys[:, s : s + hp.batch_size])
        params = params + (w - params).mean(dim=0)
        return k

    return steady_rate(cfg.rounds, warmup, one_round)


def plain_reference(cfg, warmup: int) -> float:
    """The plain reference of issue 28: all clients' data pre-stacked as one [n, per, F]
    tensor; each round the sampled clients gathered with a per-client permutation, their local
    epoch as vmap(grad(loss)) over per-tensor stacked parameters updated with
    torch._foreach_add_, then the sample-weighted mean. One process, every core."""
    n, per, x, y, sizes, model, spec, init = stacked(cfg)
    params = {k: v.clone() for k, v in spec.unflatten(init).items()}
    step = plain_step(model)
    hp, k = cfg.training, cfg.population.participation.clients_per_round
    rng = np.random.default_rng(0)

    def one_round(r: int) -> int:
        nonlocal params
        chosen = torch.from_numpy(np.sort(rng.choice(n, k, replace=False)))
        xs, ys = shuffled(x[chosen], y[chosen])
        w = plain_sgd(step, {name: p.expand(k, *p.shape).clone() for name, p in params.items()},
                      xs, ys, hp.batch_size, hp.lr)
        weights = sizes[chosen] / sizes[chosen].sum()
        params = {name: torch.tensordot(weights, v, dims=1) for name, v in w.items()}
        return k

    return steady_rate(cfg.rounds, warmup, one_round)


def bmm_reference(cfg, warmup: int) -> float:
    """Issue 28's stretch reference: W1's MLP (one hidden ReLU layer) stepped by hand-written
    batched products over the round's clients (`baddbmm`/`bmm` forward and backward, no
    autograd), the plain reference's data, shuffles and weighted mean. One process, every
    core."""
    n, per, x, y, sizes, _, spec, init = stacked(cfg)
    p = spec.unflatten(init)
    (w1, b1), (w2, b2) = [(p[f"{i}.weight"], p[f"{i}.bias"]) for i in (1, 3)]
    hp, k = cfg.training, cfg.population.participation.clients_per_round
    rng = np.random.default_rng(0)

    def one_round(r: int) -> int:
        nonlocal w1, b1, w2, b2
        chosen = torch.from_numpy(np.sort(rng.choice(n, k, replace=False)))
        xs, ys = shuffled(x[chosen], y[chosen])
        cw1, cb1, cw2, cb2 = (t.expand(k, *t.shape).clone() for t in (w1, b1, w2, b2))
        for s in range(0, per, hp.batch_size):
            xb, yb = xs[:, s: s + hp.batch_size], ys[:, s: s + hp.batch_size]
            h = torch.relu(torch.baddbmm(cb1[:, None], xb, cw1.transpose(1, 2)))
            d = torch.softmax(torch.baddbmm(cb2[:, None], h, cw2.transpose(1, 2)), dim=-1)
            d.scatter_add_(-1, yb[..., None], torch.full_like(d[..., :1], -1.0))
            d /= xb.shape[1]  # the batch's mean cross-entropy
            dh = torch.bmm(d, cw2) * (h > 0)
            cw2.baddbmm_(d.transpose(1, 2), h, alpha=-hp.lr)
            cb2.add_(d.sum(dim=1), alpha=-hp.lr)
            cw1.baddbmm_(dh.transpose(1, 2), xb, alpha=-hp.lr)
            cb1.add_(dh.sum(dim=1), alpha=-hp.lr)
        weights = sizes[chosen] / sizes[chosen].sum()
        w1, b1, w2, b2 = (torch.tensordot(weights, t, dims=1) for t in (cw1, cb1, cw2, cb2))
        return k

    return steady_rate(cfg.rounds, warmup, one_round)


def main() -> None:
    args = parser(__doc__, repeats=5).parse_args()
    cfg = load_config(CONFIG, [f"rounds={args.rounds}", f"training.executor={args.executor}"])
    medians = alternate(args, cfg, {
        "plain": lambda: plain_reference(cfg, args.warmup),
        "bmm": lambda: bmm_reference(cfg, args.warmup),
        **{f: (lambda f=f: reference(cfg, args.warmup, f)) for f in ("vmap_grad", "vmap_loss")}})
    eng, plain, bmm, *refs = medians.values()
    best = max(refs)
    print(f"W1 steady state (rounds >= {args.warmup} of {args.rounds}), median of "
          f"{args.repeats}, client-updates/s:")
    threads = torch.get_num_threads()
    print(f"  plain reference (issue 28), dict params, {threads} threads: {plain:8,.0f}")
    print(f"  bmm reference (no autograd, the stretch), {threads} threads: {bmm:8,.0f}")
    print(f"  reference, vmap(grad(loss)),      {threads} threads: {refs[0]:8,.0f}")
    print(f"  reference, vmap(loss) + autograd, {threads} threads: {refs[1]:8,.0f}")
    pad = " " * (11 - len(args.executor))
    print(f"  engine, Ray pools + {args.executor} executor:{pad}{eng:8,.0f}")
    print(f"  ratio engine / bmm reference: {eng / bmm:.2f}x")
    print(f"  ratio engine / plain reference: {eng / plain:.2f}x   "
          f"(/ faster flat reference: {eng / best:.2f}x, / flat vmap(grad): "
          f"{eng / refs[0]:.2f}x)")


if __name__ == "__main__":
    main()
