"""W2: decentralized SGD on the engine (Ray pools, the config's executor, gossip through the object
store) vs an in-process plain-PyTorch reference (vmap training + sparse mixing).

Workload (configs/w2.yaml): 1000 peers on a random 4-regular graph with Metropolis-Hastings
weights; W1's data and model; each peer 1 local epoch (batch 16, lr 0.05), then one gossip
step; 20 rounds in the config, 40 here (`--rounds`). Prints steady-state peer-updates/s of
both (rounds after `--warmup`) and the ratio, alternating engine and reference `--repeats`
times.

    python benchmarks/w2.py [--pools N] [--rounds R] [--repeats K]
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
from scenarios import topology
from scenarios.mixing import metropolis_hastings

CHUNK = 250
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "w2.yaml"


def mixing(cfg, n: int) -> torch.Tensor:
    """W2's mixing matrix as a sparse CSR tensor: Metropolis-Hastings on a random regular
    graph."""
    graph = topology.random_regular(n, np.random.default_rng(0), degree=cfg.topology.degree)
    w = metropolis_hastings(graph).astype(np.float32).tocsr()
    return torch.sparse_csr_tensor(torch.from_numpy(w.indptr).long(),
                                   torch.from_numpy(w.indices).long(),
                                   torch.from_numpy(w.data), size=w.shape)


def reference(cfg, warmup: int) -> float:
    """Every peer's parameters as one tensor [n, P]; per round, all peers take their local
    epoch together under vmap(grad(loss)), then X <- W X with a sparse CSR product."""
    n, per, x, y, _, model, spec, init = stacked(cfg)
    w_t = mixing(cfg, n)
    models = init.expand(n, -1).clone()
    hp = cfg.training

    def loss(flat, xb, yb):
        return F.cross_entropy(functional_call(model, spec.unflatten(flat), (xb,)), yb)

    step = vmap(grad(loss))

    def one_round(r: int) -> int:
        nonlocal models
        xs, ys = shuffled(x, y)
        for lo in range(0, n, CHUNK):  # peers in cache-sized blocks (measured: fastest)
            block = models[lo: lo + CHUNK]
            for s in range(0, per, hp.batch_size):
                block -= hp.lr * step(block, xs[lo: lo + CHUNK, s: s + hp.batch_size],
                                      ys[lo: lo + CHUNK, s: s + hp.batch_size])
        models = torch.sparse.mm(w_t, models)
        return n

    return steady_rate(cfg.rounds, warmup, one_round)


def plain_reference(cfg, warmup: int) -> float:
    """The plain reference of issue 28: every peer's parameters stacked per tensor (a dict of
    [n, ...]); per round all peers take their local epoch together (vmap(grad(loss)),
    torch._foreach_add_), then one sparse mixing step per parameter tensor. One process,
    every core."""
    n, per, x, y, _, model, spec, init = stacked(cfg)
    w_t = mixing(cfg, n)
    start = spec.unflatten(init)
    models = {k: v.expand(n, *v.shape).clone() for k, v in start.items()}
    step, hp = plain_step(model), cfg.training

    def one_round(r: int) -> int:
        nonlocal models
        xs, ys = shuffled(x, y)
        models = plain_sgd(step, models, xs, ys, hp.batch_size, hp.lr)
        models = {k: torch.sparse.mm(w_t, v.reshape(n, -1)).reshape(v.shape)
                  for k, v in models.items()}
        return n

    return steady_rate(cfg.rounds, warmup, one_round)


def main() -> None:
    args = parser(__doc__, repeats=3).parse_args()
    cfg = load_config(CONFIG, [f"rounds={args.rounds}", f"training.executor={args.executor}"])
    eng, plain, ref = alternate(args, cfg, {
        "plain": lambda: plain_reference(cfg, args.warmup),
        "reference": lambda: reference(cfg, args.warmup)}).values()
    print(f"W2 steady state (rounds >= {args.warmup} of {args.rounds}), median of "
          f"{args.repeats}, peer-updates/s:")
    threads = torch.get_num_threads()
    print(f"  plain reference (issue 28), dict params, {threads} threads: {plain:8,.0f}")
    print(f"  reference, flat vmap(grad) in blocks + sparse mixing, {threads} threads: "
          f"{ref:8,.0f}")
    print(f"  engine, Ray pools + {args.executor} executor + gossip:{'':<{8 - len(args.executor)}}"
          f"{eng:8,.0f}")
    print(f"  ratio engine / plain reference: {eng / plain:.2f}x   (/ flat reference: "
          f"{eng / ref:.2f}x)")


if __name__ == "__main__":
    main()
