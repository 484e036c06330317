"""The synchronous decentralized round loop (D-SGD): every peer trains locally, then `steps`
gossip steps mix the peers' models with the round's W, then metrics and logs.

Each pool holds its peers' models. Per gossip step a pool exports, once, the rows other pools
read (through the object store on Ray: refs go from pool to pool, not via the driver) and
mixes its rows of W over its own and the imported rows. No per-peer Ray calls.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse

from engine.backends.runtime import Pools, pool_of
from engine.compute.evaluation import Evaluator
from engine.compute.peers import MixPlan, MixStats, PeerPool, PeerScores, PeerTrainStats
from engine.core import tree
from engine.core.errors import Diverged
from engine.core.seeds import SeedTree
from engine.core.tree import TreeSums
from engine.loops.keeper import Keeper
from engine.loops.skeleton import LoopResult, Round, Schedule, Scores, Timing, run_rounds
from engine.loops.world import PeerWorld
from engine.records.logs import MISSING, PeerRows, RoundRows, RunLogger, event_rows
from engine.records.progress import RoundProgress
from scenarios.network import Network


@dataclass(frozen=True)
class GossipSetup:
    rounds: int
    steps: int  # gossip steps per round
    eval_every: int  # 0: the last round only
    eval_peers: int  # peers scored per evaluation (0: all honest peers)
    final_merge: bool  # average every model once at the end ("A Single Merging Suffices")
    seeds: SeedTree
    byzantine: np.ndarray  # sorted ids
    world: PeerWorld  # who is online, who trains, the round's W, how long it lasts
    model_bytes: int = 0  # bytes of one gossip message (a model, or a compressed difference)
    dead_rounds: int = 0  # all-dropped rounds in a row that end the run as diverged
    schedule: np.ndarray | None = None  # gossip steps of each round (None: `steps` always)

    def steps_at(self, r: int) -> int:
        return self.steps if self.schedule is None else int(self.schedule[r])


def pool_imports(w: sparse.csr_matrix, bounds: np.ndarray) -> list[list[np.ndarray]]:
    """imports[p][q]: the ids of pool q's peers that pool p's rows of W read (empty for q = p)."""
    num_pools = bounds.size - 1
    out = []
    for p in range(num_pools):
        cols = np.unique(w.indices[w.indptr[bounds[p]]: w.indptr[bounds[p + 1]]])
        cuts = np.searchsorted(cols, bounds)
        out.append([cols[cuts[q]: cuts[q + 1]] if q != p else cols[:0]
                    for q in range(num_pools)])
    return out


def _exports(imports: list[list[np.ndarray]], q: int) -> list[np.ndarray]:
    """What pool q sends to each pool: the rows that pool imports from q."""
    return [imports[p][q] for p in range(len(imports))]


def level_plan(w: sparse.csr_matrix, bounds: np.ndarray, p: int, imports,
               next_imports) -> MixPlan:
    """Pool p's rows of W, what it imports for them, and what it exports for the next step's
    imports (`next_imports`; None: nothing, the last step)."""
    lo, hi = w.indptr[bounds[p]], w.indptr[bounds[p + 1]]
    return MixPlan(crow=w.indptr[bounds[p]: bounds[p + 1] + 1] - lo,
                   cols=w.indices[lo:hi].astype(np.int64), vals=w.data[lo:hi].astype(np.float32),
                   pool=p, imports=imports[p],
                   exports=[ids[:0] for ids in imports[p]] if next_imports is None
                   else _exports(next_imports, p))


def _plan(w: sparse.csr_matrix, bounds: np.ndarray, p: int, imports, last: bool) -> MixPlan:
    lo, hi = w.indptr[bounds[p]], w.indptr[bounds[p + 1]]
    return MixPlan(crow=w.indptr[bounds[p]: bounds[p + 1] + 1] - lo,
                   cols=w.indices[lo:hi].astype(np.int64), vals=w.data[lo:hi].astype(np.float32),
                   pool=p, imports=imports[p],
                   exports=[ids[:0] for ids in imports[p]] if last else _exports(imports, p),
                   last=last)


def gossip_round(pools: Pools, w: sparse.csr_matrix, round_idx: int, steps: int,
                 shift: np.ndarray | None, active: np.ndarray | None = None
                 ) -> tuple[list[PeerTrainStats], list[MixStats]]:
    """Train the active peers (default: all), then `steps` gossip steps with W; the pools'
    stats."""
    w, imports, n = _sorted(w), pool_imports(w, pools.bounds), pools.num_pools
    parts = [None] * n if active is None else np.split(
        active, np.searchsorted(active, pools.bounds[1:-1]))
    carried = pools.map(PeerPool.train_peers,
                         [(round_idx, _exports(imports, q), parts[q]) for q in range(n)],
                         num_returns=1 + n)
    trained = pools.get([c[0] for c in carried])
    return trained, gossip_steps(pools, w, imports, carried, steps, shift)


def mix_only(pools: Pools, w: sparse.csr_matrix, steps: int,
             shift: np.ndarray | None = None) -> list[MixStats]:
    """`steps` gossip steps with W and no training (pure averaging)."""
    w, imports, n = _sorted(w), pool_imports(w, pools.bounds), pools.num_pools
    carried = pools.map(PeerPool.export, [(_exports(imports, q),) for q in range(n)],
                         num_returns=1 + n)
    return gossip_steps(pools, w, imports, carried, steps, shift)


def gossip_steps(pools: Pools, w: sparse.csr_matrix, imports, carried, steps: int,
                 shift: np.ndarray | None) -> list[MixStats]:
    """Each step: pool p mixes its rows over its own rows and those `carried` to it."""
    n = pools.num_pools
    for step in range(steps):
        args = []
        for p in range(n):
            received = [carried[q][1 + p] for q in range(n) if imports[p][q].size]
            args.append((_plan(w, pools.bounds, p, imports, step == steps - 1), shift, *received))
        carried = pools.map(PeerPool.gossip, args, num_returns=1 + n)
    return pools.get([c[0] for c in carried])


def _identity(n: int) -> sparse.csr_matrix:
    return sparse.identity(n, dtype=np.float64, format="csr")


def _sorted(w: sparse.csr_matrix) -> sparse.csr_matrix:
    w = sparse.csr_matrix(w)
    w.sort_indices()
    return w


def consensus_summary(stats: list[MixStats], shift: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(mean model z_bar, consensus distance mean_i ||z_i - z_bar||^2) over honest peers,
    from the pools' sums around `shift` (float32: the previous mean; little cancellation)."""
    squared = np.concatenate([s.squared for s in stats])  # pools in order: ids ascending
    count = squared.size
    sums = TreeSums.concat([s.sums for s in stats])
    centred = tree.total(sums, sums.sums.shape[1]).double().numpy() / count
    distance = (float(squared.sum()) - count * float(centred @ centred)) / count
    mean = centred if shift is None else centred + shift.astype(np.float32)
    return mean, max(distance, 0.0)


class PeerEvaluation:
    """Evaluates peers on the skeleton's schedule: the averaged model on the test set, and a
    seeded sample of honest peers on a test sample (their scores kept for the peers table)."""

    def __init__(self, setup: GossipSetup, pools: Pools, evaluator: Evaluator) -> None:
        self.setup, self.pools, self.evaluator = setup, pools, evaluator
        self.peers: PeerScores | None = None

    def __call__(self, mean: np.ndarray, r: int) -> Scores:
        scored = _evaluate(self.setup, self.pools, self.evaluator, mean, r)
        self.peers = scored.peers
        return scored.mean

    def taken(self) -> PeerScores | None:
        """The last evaluation's peer scores, once (None when the round was not evaluated)."""
        peers, self.peers = self.peers, None
        return peers


class GossipRounds:
    """Synchronous D-SGD rounds: the round's W (graph, sampling or faults), training of the
    active peers, `steps` gossip steps, consensus sums, and the final merge."""

    def __init__(self, setup: GossipSetup, pools: Pools, network: Network,
                 evaluator: Evaluator, logger: RunLogger) -> None:
        self.setup, self.pools, self.network, self.logger = setup, pools, network, logger
        self.scores = PeerEvaluation(setup, pools, evaluator)
        self.shift: np.ndarray | None = None
        self.mean, self.consensus_distance = None, math.nan
        self.aggregate: np.ndarray | None = None  # MoDeST: the last round's model
        self.last: tuple = ()

    def step(self, r: int, last: bool) -> Round:
        t0 = time.perf_counter()
        plan = self.setup.world.plan(r)
        self.logger.append(event_rows(r, plan.start_s, plan.events))
        w, steps = plan.w, self.setup.steps_at(r)
        # a round without communication (a schedule's 0): one step with the identity, which
        # leaves every model as it is and sends nothing
        trained, mixed = gossip_round(self.pools, w if steps else _identity(w.shape[0]), r,
                                      max(steps, 1), self.shift, plan.trainers)
        t1 = time.perf_counter()
        self.mean, self.consensus_distance = consensus_summary(mixed, self.shift)
        if plan.evaluated is not None:
            self.aggregate = peer_models(self.pools, np.array([plan.evaluated]))[0]
        if self.setup.final_merge and last:
            self.pools.get(self.pools.map(PeerPool.set_models,
                                          [(self.mean,)] * self.pools.num_pools))
            self.consensus_distance, self.aggregate = 0.0, None
        losses = _honest_losses(trained, self.setup.byzantine)
        self.setup.world.reported(*_peer_losses(trained))
        messages = (w.nnz - w.shape[0]) * steps  # off-diagonal: one model each
        sent = (np.bincount(w.indices, minlength=w.shape[0]) - 1) * steps
        self.last = (trained, losses, messages, plan.start_s + plan.duration_s,
                     sent * self.setup.model_bytes)
        return Round(int(sum(t.peer_ids.size for t in trained)),
                     float(losses.mean()) if losses.size else MISSING, t1 - t0,
                     time.perf_counter() - t1)

    def evaluate(self, r: int) -> Scores:
        return self.scores(self.round_model(), r)

    def round_model(self) -> np.ndarray:
        """The model a round stands for: the peers' average, or MoDeST's last aggregate."""
        return self.mean if self.aggregate is None else self.aggregate

    def record(self, r: int, done: Round, scores: Scores, timing: Timing) -> None:
        trained, losses, messages, vtime, sent = self.last
        _log_round(self.logger, self.setup, r, trained, self.scores.taken(), scores, done,
                   self.consensus_distance, messages, vtime, timing, self.pools.bounds, sent)

    def check(self, r: int) -> None:
        check_consensus(self.mean, self.consensus_distance, r)
        self.shift = self.mean.astype(np.float32)  # the next reference point (as pools use)

    def model(self) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.round_model(), dtype=np.float32))


def decentralized_rounds(setup: GossipSetup, pools: Pools, network: Network,
                         evaluator: Evaluator, logger: RunLogger,
                         progress: RoundProgress, keeper: Keeper | None = None) -> LoopResult:
    loop = GossipRounds(setup, pools, network, evaluator, logger)
    return run_rounds(loop, Schedule(setup.rounds, setup.eval_every, setup.dead_rounds), progress,
                      keeper)


def peer_models(pools: Pools, ids: np.ndarray) -> np.ndarray:
    """[len(ids), P] float64: the models of peers `ids` (sorted), from the pools owning them."""
    parts = np.split(ids, np.searchsorted(ids, pools.bounds[1:-1]))
    rows = pools.get(pools.map(PeerPool.models_of, [(part,) for part in parts]))
    return np.concatenate(rows).astype(np.float64)


def _peer_losses(trained: list[PeerTrainStats]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([t.peer_ids for t in trained]),
            np.concatenate([t.losses for t in trained]))


def _honest_losses(trained: list[PeerTrainStats], byzantine: np.ndarray) -> np.ndarray:
    ids = np.concatenate([t.peer_ids for t in trained])
    losses = np.concatenate([t.losses for t in trained])
    return losses[~np.isin(ids, byzantine)]


@dataclass(frozen=True)
class _Scored:
    mean: Scores  # the averaged model's
    peers: PeerScores | None


def _evaluate(setup: GossipSetup, pools: Pools, evaluator: Evaluator, mean: np.ndarray,
              r: int) -> _Scored:
    """The averaged model on the test set, and a seeded sample of honest peers on a test
    sample (every honest peer when eval_peers is 0)."""
    averaged = Scores(*evaluator(torch.from_numpy(mean.astype(np.float32))))
    sample = _peer_sample(setup, int(pools.bounds[-1]), r)
    parts = np.split(sample, np.searchsorted(sample, pools.bounds[1:-1]))
    scores = pools.get(pools.map(PeerPool.evaluate_peers, [(ids, mean) for ids in parts]))
    joined = PeerScores(*(np.concatenate(c) for c in zip(*[
        (s.peer_ids, s.test_loss, s.test_accuracy, s.distance, s.test_return) for s in scores],
        strict=True)))
    return _Scored(averaged, joined)


def _peer_sample(setup: GossipSetup, n: int, r: int) -> np.ndarray:
    honest = np.setdiff1d(np.arange(n), setup.byzantine)
    if setup.eval_peers == 0 or setup.eval_peers >= honest.size:
        return honest
    rng = setup.seeds.rng("eval_peers", r)
    return np.sort(rng.choice(honest, setup.eval_peers, replace=False))


def _log_round(logger: RunLogger, setup: GossipSetup, r: int, trained,
               peers: PeerScores | None, scores: Scores, done: Round, distance: float,
               messages: int, vtime: float, timing: Timing, bounds: np.ndarray,
               sent: np.ndarray) -> None:
    if peers is not None:
        logger.append(peer_rows(r, peers, bounds, trained, sent))
    n = int(sum(t.peer_ids.size for t in trained))
    logger.append(RoundRows(
        round=[r], num_selected=[n], num_updates=[n],
        num_byzantine=[setup.byzantine.size], train_loss=[done.train_loss],
        test_loss=[scores.loss], test_accuracy=[scores.accuracy],
        test_return=[scores.test_return],
        mean_update_norm=[MISSING], round_wall_s=[timing.round_s], train_wall_s=[done.train_s],
        aggregate_wall_s=[done.aggregate_s], eval_wall_s=[timing.eval_s],
        wall_time_s=[timing.wall_s], client_updates_per_s=[n / max(timing.round_s, 1e-9)],
        consensus_distance=[distance],
        **peer_accuracy(None if peers is None else peers.test_accuracy),
        gossip_messages=[messages], bytes_communicated=[messages * setup.model_bytes],
        virtual_time=[vtime],
    ))


def peer_accuracy(acc: np.ndarray | None) -> dict[str, list]:
    """The rounds columns of the evaluated peers' accuracy (MISSING when none was scored)."""
    if acc is None or not acc.size or acc.dtype == object:  # none scored, or no accuracy
        return {"peer_accuracy_mean": [MISSING], "peer_accuracy_min": [MISSING],
                "peer_accuracy_max": [MISSING]}
    return {"peer_accuracy_mean": [float(acc.mean())], "peer_accuracy_min": [float(acc.min())],
            "peer_accuracy_max": [float(acc.max())]}


def check_consensus(mean: np.ndarray, distance: float, r: int) -> None:
    """Raise Diverged if some honest peer's model holds a NaN or inf (their mean, or the
    consensus distance, is then not finite), after round r is logged."""
    if not (np.isfinite(mean).all() and np.isfinite(distance)):
        raise Diverged(f"a peer's model is not finite after round {r}")


def peer_rows(r: int, peers: PeerScores, bounds: np.ndarray, trained: list[PeerTrainStats],
              sent: np.ndarray | None = None) -> PeerRows:
    """Rows of the evaluated peers: their pool, their training loss in round r where they
    trained (MISSING otherwise), and the bytes they sent (`sent`: per peer, all peers)."""
    size = peers.peer_ids.size
    loss = np.full(size, MISSING, dtype=object)
    if trained:
        ids = np.concatenate([t.peer_ids for t in trained])  # pools are contiguous: sorted
        losses = np.concatenate([t.losses for t in trained])
        at = np.searchsorted(ids, peers.peer_ids).clip(max=max(ids.size - 1, 0))
        found = ids[at] == peers.peer_ids if ids.size else np.zeros(size, dtype=bool)
        loss[found] = losses[at[found]]
    return PeerRows(
        round=np.full(size, r), peer_id=peers.peer_ids,
        pool=pool_of(bounds, peers.peer_ids), train_loss=loss,
        test_loss=peers.test_loss, test_accuracy=peers.test_accuracy,
        distance_to_mean=peers.distance, byzantine=np.zeros(size, dtype=bool),
        bytes_sent=np.zeros(size, np.int64) if sent is None else sent[peers.peer_ids],
        test_return=peers.test_return,
    )
