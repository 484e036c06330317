"""Synchronous federated rounds: select, train on pools, aggregate (engine/loops/skeleton.py
runs the rounds: evaluation, timers, records)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.backends.runtime import Pools, pool_of
from engine.compute.evaluation import Evaluator
from engine.compute.pool import PoolResult, finite_rows
from engine.core import parallel, tree
from engine.core.errors import Diverged
from engine.core.events import NONFINITE
from engine.core.plans import COMPLETED, RoundPlan
from engine.core.seeds import SeedTree
from engine.core.tree import TreeSums
from engine.core.updates import Updates
from engine.loops.keeper import Keeper
from engine.loops.skeleton import LoopResult, Round, Schedule, Scores, Timing, run_rounds
from engine.loops.world import SyncWorld
from engine.records.logs import MISSING, ClientRows, RoundRows, RunLogger, event_rows
from engine.records.progress import RoundProgress
from policies.base import Aggregator
from policies.privacy import DEFAULT_ORDERS, rdp_to_epsilon, sampled_gaussian_rdp
from scenarios.adversaries import Adversary


@dataclass(frozen=True)
class FederatedSetup:
    rounds: int
    eval_every: int  # 0: evaluate the last round only
    seeds: SeedTree
    pre_reduce: bool  # pools send partial sums (decomposable aggregation), not every delta
    world: SyncWorld  # who is online, selected, failing; how long each round lasts
    adversary: Adversary | None = None
    scaffold: bool = False  # keep SCAFFOLD's server control variate and send it each round
    privacy: Accountant | None = None  # central DP: epsilon after r rounds
    dead_rounds: int = 0  # all-dropped rounds in a row that end the run as diverged


class FederatedRounds:
    """Synchronous rounds (FedAvg and its variants): the world plans the round, the clients the
    server will use train on the pools, their updates are aggregated in id order."""

    consensus_distance = None

    def __init__(self, setup: FederatedSetup, pools: Pools, aggregator: Aggregator,
                 params: torch.Tensor, evaluator: Evaluator, logger: RunLogger) -> None:
        self.setup, self.pools, self.aggregator = setup, pools, aggregator
        self.params, self.evaluator, self.logger = params, evaluator, logger
        self.state = aggregator.init(params)
        self.control = torch.zeros_like(params) if setup.scaffold else None
        self.last: tuple = ()  # round r's plan, results, updates, byzantine mask, for record

    def step(self, r: int, last: bool) -> Round:
        t0 = time.perf_counter()
        plan = self.setup.world.plan(r)
        results = _train(self.pools, self.params, plan, self.setup, self.control)
        t1 = time.perf_counter()
        updates, byzantine, dropped = _received(results, self.setup, r)
        plan = plan.marked(dropped, NONFINITE)
        if updates.num_clients >= self.aggregator.min_updates:  # else the step is skipped
            with parallel.chunk_map(self.pools.chunk_map):
                step, self.state = self.aggregator.update(updates, self.state)
            self.params = self.params + step
        if updates.num_clients:
            self.setup.world.reported(updates.client_ids.numpy(), updates.losses.numpy())
        if self.control is not None and results:
            self.control = _scaffold_control(self.control, results, self.setup.world.num_clients)
        self.last = (plan, results, updates, byzantine)
        return Round(updates.num_clients, _weighted(updates.losses, updates.weights), t1 - t0,
                     time.perf_counter() - t1, int(dropped.size))

    def evaluate(self, r: int) -> Scores:
        return Scores(*self.evaluator(self.params))

    def record(self, r: int, done: Round, scores: Scores, timing: Timing) -> None:
        plan, results, updates, byzantine = self.last
        rows = _client_rows(plan, results, self.pools.bounds, updates, byzantine, self.setup)
        self.logger.append(rows)
        self.logger.append(event_rows(plan.round, plan.start_s, plan.events))
        self.logger.append(_round_row(plan, updates, byzantine, rows, done, scores, timing,
                                      self.setup))

    def check(self, r: int) -> None:
        check_finite(self.params, f"the global model is not finite after round {r}")

    def model(self) -> torch.Tensor:
        return self.params


def federated_rounds(setup: FederatedSetup, pools: Pools, aggregator: Aggregator,
                     params: torch.Tensor, evaluator: Evaluator, logger: RunLogger,
                     progress: RoundProgress, keeper: Keeper | None = None) -> LoopResult:
    loop = FederatedRounds(setup, pools, aggregator, params, evaluator, logger)
    return run_rounds(loop, Schedule(setup.rounds, setup.eval_every, setup.dead_rounds), progress,
                      keeper)


class Accountant:
    """Epsilon of central DP after r rounds of the sampled Gaussian mechanism (dp_gaussian's
    noise multiplier z, sampling rate q = K / N, the configured delta): the Renyi DP of one
    round at each order, computed once (policies/privacy.py), composed over r rounds and
    converted. q = K / N treats the fixed-size selection as Poisson sampling (the usual
    approximation)."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        self.delta = delta
        self.rdp = np.array([sampled_gaussian_rdp(noise_multiplier, sampling_rate, a)
                             for a in DEFAULT_ORDERS])

    def __call__(self, rounds: int) -> float:
        return min(rdp_to_epsilon(rounds * rdp, a, self.delta)
                   for rdp, a in zip(self.rdp, DEFAULT_ORDERS, strict=True))


def _train(pools: Pools, params: torch.Tensor, plan: RoundPlan, setup: FederatedSetup,
           control: torch.Tensor | None) -> list[PoolResult]:
    """Only the clients whose updates the server will aggregate train: the others' results
    would be lost or discarded, and the plan does not depend on them."""
    kept = plan.status == COMPLETED
    if not kept.any():
        return []
    budgets = plan.steps[kept] if setup.world.anarchic else None
    return pools.train(params, plan.selected[kept], plan.round, setup.pre_reduce, control,
                       budgets)


def check_finite(params: torch.Tensor, message: str) -> None:
    """Raise Diverged(message) if the model holds a NaN or inf (after its round is logged)."""
    if not bool(torch.isfinite(params).all()):
        raise Diverged(message)


def _received(results: list[PoolResult], setup: FederatedSetup,
              r: int) -> tuple[Updates, np.ndarray, np.ndarray]:
    """The updates the server aggregates, which of them come from attackers, and the ids of
    updates dropped for a NaN or inf (found by the pools, or in what attackers sent)."""
    if not results:
        return Updates.empty(), np.zeros(0, dtype=bool), np.zeros(0, np.int64)
    updates, byzantine = _attacked(Updates.concat([res.updates for res in results]), setup, r)
    dropped = [res.nonfinite for res in results]
    if updates.deltas is not None:
        finite = finite_rows(updates.deltas)
        if not bool(finite.all()):
            dropped.append(updates.client_ids.numpy()[~finite.numpy()])
            updates, byzantine = updates.take(torch.nonzero(finite).squeeze(1)), \
                byzantine[finite.numpy()]
    return updates, byzantine, np.sort(np.concatenate(dropped))


def _round_row(plan: RoundPlan, updates: Updates, byzantine: np.ndarray, rows: ClientRows,
               done: Round, scores: Scores, timing: Timing, setup: FederatedSetup) -> RoundRows:
    norms = rows.update_norm[rows.status == COMPLETED].astype(np.float64)
    return RoundRows(
        round=[plan.round], num_selected=[plan.selected.size], num_updates=[updates.num_clients],
        num_byzantine=[int(byzantine.sum())], train_loss=[done.train_loss],
        test_loss=[scores.loss], test_accuracy=[scores.accuracy],
        test_return=[scores.test_return],
        mean_update_norm=[float(norms.mean()) if norms.size else MISSING],
        round_wall_s=[timing.round_s], train_wall_s=[done.train_s],
        aggregate_wall_s=[done.aggregate_s], eval_wall_s=[timing.eval_s],
        wall_time_s=[timing.wall_s],
        client_updates_per_s=[updates.num_clients / max(timing.round_s, 1e-9)],
        virtual_time=[plan.start_s + plan.duration_s], bytes_communicated=[plan.bytes],
        dp_epsilon=[MISSING if setup.privacy is None else setup.privacy(plan.round + 1)],
        aggregation_latency_s=[MISSING if plan.aggregation is None else plan.aggregation[0]],
        aggregator_s=[MISSING if plan.aggregation is None else plan.aggregation[1]],
    )


def _scaffold_control(control: torch.Tensor, results: list[PoolResult],
                      num_clients: int) -> torch.Tensor:
    """SCAFFOLD's server step for c (Karimireddy et al., 2020): c += (1/N) sum_i delta c_i,
    the sum finished on the fixed id tree (the same bits for any pool layout)."""
    sums = TreeSums.concat([res.control_sums for res in results])
    return control + tree.total(sums, control.numel()) / num_clients


def _attacked(updates: Updates, setup: FederatedSetup, r: int) -> tuple[Updates, np.ndarray]:
    """The updates as the server receives them, and which of them come from attackers."""
    if setup.adversary is None:
        return updates, np.zeros(updates.num_clients, dtype=bool)
    gen = torch.Generator().manual_seed(setup.seeds.integer("attack", r))
    updates, mask = setup.adversary.corrupt(updates, gen)
    return updates, mask.numpy()


def _weighted(values: torch.Tensor, weights: torch.Tensor) -> float | None:
    if values.numel() == 0:
        return MISSING
    total = float(weights.sum())
    return float((values * weights).sum()) / total if total > 0 else float(values.mean())


def _client_rows(plan: RoundPlan, results: list[PoolResult], bounds: np.ndarray,
                 updates: Updates, byzantine: np.ndarray, setup: FederatedSetup) -> ClientRows:
    """One row per selected client, ordered by id: its status, steps and task time from the
    plan; training columns for the clients that reported (NaN for the others). An attacker's
    update norm is that of what it sent."""
    ids, kept = plan.selected, plan.status == COMPLETED
    trained = np.concatenate([res.updates.client_ids.numpy() for res in results]) \
        if results else np.zeros(0, np.int64)
    order = np.argsort(trained, kind="stable")
    at = np.searchsorted(trained[order], ids).clip(max=max(trained.size - 1, 0))
    has = trained[order][at] == ids if trained.size else np.zeros(ids.size, dtype=bool)

    def column(of, empty=MISSING, dtype=object) -> np.ndarray:
        """Per selected client: its pool's value where the pool returned its update (MISSING
        where it did not train)."""
        out = np.full(ids.size, empty, dtype=dtype)
        if results:
            out[has] = np.concatenate([of(res) for res in results])[order][at[has]]
        return out

    norms = column(lambda res: res.update_norms.numpy())
    norms[kept] = _sent_norms(norms[kept].astype(np.float64), updates, byzantine)
    attackers = setup.adversary.byzantine[ids] if setup.adversary is not None else \
        np.zeros(ids.size, dtype=bool)
    return ClientRows(
        round=np.full(ids.size, plan.round), client_id=ids,
        pool=np.where(has, column(lambda res: np.full(res.updates.num_clients, res.pool), -1,
                                  np.int64), pool_of(bounds, ids)),  # else: its shard's
        status=plan.status.astype(str),
        num_samples=setup.world.sizes[ids],
        local_steps=np.where(has, column(lambda res: res.updates.steps.numpy(), 0, np.int64),
                             plan.steps),  # what the pools ran, where they ran
        train_loss=column(lambda res: res.updates.losses.numpy()),
        update_norm=norms,
        weight=np.where(kept, column(lambda res: res.updates.weights.numpy(), 0.0), 0.0),
        pool_train_s=column(lambda res: np.full(res.updates.num_clients, res.train_s)),
        byzantine=attackers, task_s=np.where(np.isnan(plan.task_s), MISSING, plan.task_s),
        staleness=np.zeros(ids.size, np.int32),
        bytes_up=plan.up_bytes,
    )


def _sent_norms(norms: np.ndarray, updates: Updates, byzantine: np.ndarray) -> np.ndarray:
    if updates.deltas is None or not byzantine.any():
        return norms
    sent = torch.linalg.vector_norm(updates.deltas[torch.from_numpy(byzantine)], dim=1)
    norms = norms.copy()
    norms[byzantine] = sent.numpy()
    return norms
