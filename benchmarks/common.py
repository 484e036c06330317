"""Shared by the workload benchmarks: the engine's steady-state rate read back from its logs,
and the common command-line flags."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.compute as pc
import torch

from engine.backends.runtime import RuntimeOptions
from engine.core.params import ParamSpec, init_params
from engine.experiment import run_experiment
from engine.records.logs import read_table
from engine.resolve import build_task


def engine_rate(cfg, pools: int | None, warmup: int) -> float:
    """Updates per second of the engine (Ray backend) over rounds >= warmup: whole-loop time
    from the end of round warmup-1 (the driver's logging included); the references do not
    evaluate, so the engine's evaluation time is left out."""
    with tempfile.TemporaryDirectory() as logs:
        run_experiment(cfg, RuntimeOptions("ray", pools), Path(logs), False)
        rounds = read_table(Path(logs) / cfg.experiment, "rounds").sort_by("round")
    wall = rounds["wall_time_s"].to_numpy()  # loop time at the end of each round
    steady = rounds.slice(warmup)
    busy = wall[-1] - wall[warmup - 1] - pc.sum(steady["eval_wall_s"]).as_py()
    return pc.sum(steady["num_updates"]).as_py() / busy


def parser(doc: str, repeats: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--pools", type=int, default=None)
    p.add_argument("--rounds", type=int, default=40,
                   help="rounds of each run (the configs have 20; more steady state)")
    p.add_argument("--warmup", type=int, default=5, help="rounds left out of steady state")
    p.add_argument("--repeats", type=int, default=repeats,
                   help="alternating engine/reference runs")
    p.add_argument("--executor", default="auto",
                   help="the engine's training.executor (default: the config's, auto)")
    return p


def alternate(args, engine_cfg, references: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Run the engine, then every reference (with every core), `args.repeats` times in turn,
    so drifts in machine load hit all alike; print each repeat; return the medians."""
    rates: dict[str, list[float]] = {"engine": [], **{name: [] for name in references}}
    for i in range(args.repeats):
        rates["engine"].append(engine_rate(engine_cfg, args.pools, args.warmup))
        torch.set_num_threads(os.cpu_count() or 1)
        for name, run in references.items():
            rates[name].append(run())
        print(f"  repeat {i + 1}: " + "  ".join(f"{k} {v[-1]:7,.0f}" for k, v in rates.items()))
    return {name: float(np.median(v)) for name, v in rates.items()}


def plain_step(model: torch.nn.Module):
    """The plain reference's client step, as issue 28 describes it: vmap(grad(loss)) of a
    functional call over per-tensor stacked parameters (a dict), cross-entropy loss."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    def loss(params, xb, yb):
        return F.cross_entropy(functional_call(model, params, (xb,)), yb)

    return vmap(grad(loss))


def plain_sgd(step, params: dict, xs: torch.Tensor, ys: torch.Tensor, batch: int,
              lr: float) -> dict:
    """One local epoch of every stacked client ([k, per, ...] data, already in each client's
    shuffled order), batch by batch, updated in place with torch._foreach_add_."""
    names = list(params)
    for s in range(0, xs.shape[1], batch):
        grads = step(params, xs[:, s: s + batch], ys[:, s: s + batch])
        torch._foreach_add_([params[n] for n in names], [grads[n] for n in names], alpha=-lr)
    return params


class Stacked(NamedTuple):
    """A workload's data as the references hold it: every client's samples pre-stacked."""

    n: int  # clients
    per: int  # samples each (W1 and W2 give every client the same number)
    x: torch.Tensor  # [n, per, F]
    y: torch.Tensor  # [n, per]
    sizes: torch.Tensor  # float32 [n]
    model: torch.nn.Module
    spec: ParamSpec
    init: torch.Tensor  # the initial model, flat [P]


def stacked(cfg) -> Stacked:
    task = build_task(cfg)
    n, per = task.num_clients, int(task.client_sizes[0])
    x, y, _ = task.train_rows()  # in client order
    model = task.model.build()
    return Stacked(n, per, torch.from_numpy(x).reshape(n, per, -1),
                   torch.from_numpy(y).reshape(n, per),
                   torch.from_numpy(task.client_sizes.astype(np.float32)), model,
                   ParamSpec.of(model), init_params(task.model.build, 0))


def shuffled(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clients' stacked samples ([k, per, ...], [k, per]), each client's in a fresh random
    order."""
    perm = torch.argsort(torch.rand(y.shape), dim=1)
    return torch.take_along_dim(x, perm[..., None], dim=1), torch.take_along_dim(y, perm, dim=1)


def steady_rate(rounds: int, warmup: int, one_round: Callable[[int], int]) -> float:
    """Updates per second of `one_round(r)` (which returns its updates) over rounds >=
    warmup."""
    timed, updates = 0.0, 0
    for r in range(rounds):
        start = time.perf_counter()
        done = one_round(r)
        if r >= warmup:
            timed += time.perf_counter() - start
            updates += done
    return updates / timed

