"""PeerPool: a block of gossip peers, each with its own model.

A pool holds its block of peers' models as one tensor [n_local, P] (numerators x, with the
push-sum mass w [n_local]; a peer's model is x / w, and w = 1 unless the policy is push-sum).
Per round the driver asks it to train its peers, then for each gossip step to mix its rows of
W over the rows it imported from other pools, and to export the rows other pools need next.
A plain class: the Ray backend wraps it in an actor, the inline backend calls it in-process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.compute.evaluation import Evaluator
from engine.compute.pool import PoolSpec, make_trainer
from engine.compute.rl import ReturnEvaluator
from engine.compute.state import Checkpointed, PeerModels, RowState
from engine.core.neighbourhood import Evidence, Forge, Neighbourhood
from engine.core.params import init_params
from engine.core.seeds import splitmix64
from engine.core.tree import TreeSums
from policies import dadao
from policies.consensus import Consensus
from scenarios.task import Shard


@dataclass(frozen=True)
class PeerSpec:
    consensus: Consensus
    init: str  # "shared": every peer starts from one model; "independent": one seed each
    byzantine: np.ndarray  # sorted global ids of Byzantine peers (forge their messages)
    forge: Forge | None
    evaluator: Evaluator | ReturnEvaluator  # what scores each evaluated peer
    consensus_step: float = 1.0  # CHOCO-SGD's gamma, with compressed gossip
    num_peers: int = 0  # the population (the width of a stateful policy's per-peer rows)


@dataclass(frozen=True)
class MixPlan:
    """One gossip step of one pool: its rows of W in CSR form over global peer ids, which rows
    it imports from each pool (its own block where q is itself), and which of its rows each
    pool needs after the step (empty lists after the round's last step)."""

    crow: np.ndarray  # [n_local + 1] int64
    cols: np.ndarray  # [nnz] int64 global ids, ascending within a row
    vals: np.ndarray  # [nnz] float32
    pool: int  # this pool's index
    imports: list[np.ndarray]  # per pool q != pool: global ids this pool reads from q
    exports: list[np.ndarray]  # per pool q: own global ids to send to q for the next step
    last: bool = False  # the round's last gossip step (no step follows it)


@dataclass(frozen=True)
class LevelTimes:
    """DADAO's event times for one asynchronous level (aligned with its steps, local pairs and
    cross ends) and the rate-weighted Laplacian's chi_1* of the unit's graph."""

    steps: np.ndarray
    pairs: np.ndarray
    cross: np.ndarray
    chi1_star: float


@dataclass(frozen=True)
class MixStats:
    """Around the driver's reference point c (float32 [P]), over this pool's honest peers'
    models z = x / w: its part of the fixed id-tree sums (engine/core/tree.py) of z - c, and each
    peer's ||z - c||^2 in float64. The driver finishes both in id order: the same bits for
    any pool layout."""

    peer_ids: np.ndarray  # [k] honest peers of the pool
    squared: np.ndarray  # [k] float64 ||z - c||^2
    sums: TreeSums  # float32 [m, P]
    mix_s: float


@dataclass(frozen=True)
class PeerTrainStats:
    peer_ids: np.ndarray
    losses: np.ndarray
    steps: np.ndarray
    train_s: float


@dataclass(frozen=True)
class PeerScores:
    peer_ids: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    distance: np.ndarray  # ||z_i - mean model||^2
    test_return: np.ndarray  # a task learnt by acting (loss and accuracy then null)


def _column(values: tuple) -> np.ndarray:
    """float64 values, or an object column of nulls (a score this task does not have)."""
    if any(v is None for v in values):
        return np.array(values, dtype=object)
    return np.array(values, dtype=np.float64)


Export = tuple[np.ndarray, np.ndarray, np.ndarray]  # (global ids, models [e, P], mass [e])


class PeerPool(Checkpointed):
    """A block of gossip peers: trains them from their own models, mixes them with their
    neighbours' in gossip steps, and keeps their models (and momentum) as components."""

    def __init__(self, spec: PoolSpec, shard: Shard, peers: PeerSpec,
                 params: np.ndarray) -> None:
        self.trainer = make_trainer(spec, shard)
        self.spec, self.peers, self.seeds = spec, peers, self.trainer.seeds
        self.client_ids = shard.client_ids
        self.evaluator = peers.evaluator
        self.state = PeerModels(self._initial_models(torch.from_numpy(np.array(params,
                                                                                copy=True))))
        self.honest = torch.from_numpy(~np.isin(self.client_ids, peers.byzantine))
        self.layers = self.trainer.param_spec.spans()
        self._step_counts = np.zeros(self.client_ids.size, dtype=np.uint64)
        # local momentum buffers (training.momentum > 0), kept across rounds as in MoNNA
        self.momentum = (RowState(*self.state.numer.shape) if spec.hp.momentum > 0 else None)
        self._pending: np.ndarray | None = None
        # compressed gossip (CHOCO-SGD): each peer's public copy x_hat, which its neighbours
        # read; a step sends q = C(x - x_hat) and everyone's x_hat += q
        self.compressor = None if spec.compressor.lossless else spec.compressor
        self.public = RowState(*self.state.numer.shape) if self.compressor is not None else None
        self.contraction = 1.0 if self.compressor is None else \
            self.compressor.contraction(int(self.state.numer.shape[1]))
        self._published = 0
        self._messages = np.zeros(self.client_ids.size, dtype=np.uint64)  # per peer, async
        # a stateful policy's rows (e.g. reputations), and the count of gossip steps and
        # wake-up levels so far, which keys the batches of own data a judging policy reads
        init = peers.consensus.init_state
        self.policy_state = None if init is None else \
            init(peers.num_peers).double().expand(self.client_ids.size, -1).clone()
        self._judged = 0
        # DADAO (policies/dadao.py): each peer's [x, x~, y, y~, z, z~] (float64) and the time
        # of its last event; x is also the model (float32) the pool trains and evaluates
        self.accelerated = peers.consensus.accelerated
        self.dadao = None if self.accelerated is None else dadao.initial_state(self.state.numer)
        self.clock = np.zeros(self.client_ids.size)
        self._chi1_star = 0.0
        self.trainer.local_training(torch.from_numpy(np.array(params)), self.client_ids[:32],
                                    0)  # warm-up, discarded

    def _initial_models(self, shared: torch.Tensor) -> torch.Tensor:
        if self.peers.init == "shared":
            return shared.expand(self.client_ids.size, -1).clone()
        return torch.stack([init_params(self.spec.model.build, int(self.seeds.integer("init", i)))
                            for i in self.client_ids])

    def ready(self) -> int:
        """Number of peers owned; a cheap call to wait for construction to finish."""
        return int(self.client_ids.size)

    def models(self) -> torch.Tensor:
        """[n_local, P]: the peers' de-biased models x / w (a new tensor)."""
        return self.state.models()

    def train_peers(self, round_idx: int, exports: list[np.ndarray],
                    active: np.ndarray | None = None):
        """Local training of the block's `active` peers (default: all) from their own models;
        x += delta (SGP's update of the numerator at the de-biased point). Returns stats, then
        one export per pool."""
        start = time.perf_counter()
        ids = self.client_ids if active is None else active
        if ids.size == 0:  # none of the block's peers trains (crashed, or not sampled)
            empty = PeerTrainStats(ids, np.zeros(0, np.float32), np.zeros(0, np.int64), 0.0)
            return (empty, *self._exports(exports))
        local = self.trainer.local(ids)
        out, _ = self.trainer.local_training(self.state.rows(local), ids, round_idx,
                                             momentum=self._momentum_rows(local))
        self.state.step(local, out.deltas)
        self._keep_momentum(local, out)
        stats = PeerTrainStats(ids, out.losses.numpy(), out.steps.numpy(),
                               time.perf_counter() - start)
        return (stats, *self._exports(exports))

    def gossip(self, plan: MixPlan, shift: np.ndarray | None, *imported: Export):
        """One gossip step over the rows of `plan`, reading the imported rows; returns the
        step's stats, then one export per pool for the next step."""
        start = time.perf_counter()
        self._judged += 1  # every pool counts every step, whatever its rows do
        if self.public is None:
            nb = self._neighbourhood(plan, list(imported))
            self.state.replace(*self._policy(nb)[:2])
        else:  # CHOCO: x += gamma (policy over the public copies - own public copy)
            own = self.public.rows
            nb = self._neighbourhood(plan, list(imported), own)
            mixed = self._policy(nb)[0]
            self.state.numer = self.state.numer + self.peers.consensus_step * (mixed - own)
        stats = self._stats(shift, time.perf_counter() - start)
        return (stats, *self._exports(plan.exports, publish=not plan.last))

    # Asynchronous gossip: one call per conflict-free level of events
    # (engine/loops/async_gossip.py).

    def async_level(self, steps: np.ndarray, pairs: np.ndarray, cross: np.ndarray,
                    exports: list[np.ndarray], times: LevelTimes | None, *imported: Export):
        """Finish the previous level's cross-pool exchanges with the `imported` rows, then run
        this level: one local SGD step for each of `steps`, pairwise averaging of `pairs`
        ([k, 2], both ends here), and the own ends of `cross` ([c, 2]: own id, partner id)
        wait for the partner's row. With DADAO (`times`), its gradient and communication
        events instead. Returns the number of steps, then one export per pool."""
        self._finish_cross(imported)
        if times is not None:
            self._dadao_level(steps, pairs, cross, times)
            return (int(steps.size), *self._exports(exports, accelerated=True))
        if steps.size:
            self._one_step(steps)
        if pairs.size:
            self.state.average_pairs(*(self.trainer.local(pairs[:, c]) for c in (0, 1)))
        self._pending = cross
        return (int(steps.size), *self._exports(exports))

    def wake_level(self, steps: np.ndarray, plan: MixPlan, *imported: Export):
        """One level of wake-ups: one local SGD step for each of `steps`, then the consensus
        update of the rows of `plan` that are not the identity's (the peers woken at this
        level pull their live neighbours' models, or push shares of theirs; every other row
        is left as it is). Returns the number of steps, then one export per pool."""
        self._judged += 1  # every pool counts every level, woken rows or not
        if steps.size:
            self._one_step(steps)
        single = np.diff(plan.crow) == 1
        woken = ~single  # rows that are not the identity's: neighbours, or a kept share
        woken[single] = plan.vals[plan.crow[:-1][single]] != 1.0
        rows = torch.from_numpy(np.flatnonzero(woken))
        if woken.any() and self.public is None:
            nb = self._neighbourhood(plan, list(imported))
            numer, mass = self._policy(nb, rows)[:2]
            self.state.numer[rows], self.state.mass[rows] = numer[rows], mass[rows]
        elif woken.any():  # CHOCO, one peer at a time: publish, then step on public copies
            self._publish(rows)
            own = self.public.rows
            mixed = self._policy(self._neighbourhood(plan, list(imported), own), rows)[0]
            self.state.numer[rows] += self.peers.consensus_step * (mixed[rows] - own[rows])
        return (int(steps.size), *self._exports(plan.exports, publish=False))

    def _policy(self, nb: Neighbourhood, rows: torch.Tensor | None = None) -> tuple:
        """The consensus update; a stateful policy's new state rows are kept (only `rows`,
        the woken peers, in an asynchronous level)."""
        out = self.peers.consensus.update(nb)
        if self.policy_state is not None:
            if rows is None:
                self.policy_state = out[2]
            else:
                self.policy_state[rows] = out[2][rows]
        return out

    def async_flush(self, shift: np.ndarray | None, until: float | None = None,
                    *imported: Export) -> MixStats:
        """Finish the last level's exchanges (DADAO: then every peer's ODE runs on to
        `until`, the unit's end); the block's consensus sums."""
        self._finish_cross(imported)
        if self.dadao is not None and until is not None:
            self._advance(np.arange(self.client_ids.size), np.full(self.client_ids.size, until))
        return self._stats(shift, 0.0)

    # DADAO (policies/dadao.py): one call per conflict-free level, as plain gossip

    def _constants(self) -> dadao.Constants:
        return dadao.constants(self.accelerated, self._chi1_star)

    def _advance(self, local: np.ndarray, t: np.ndarray) -> None:
        """Run the ODE of the peers at `local` from their last event to the times `t`."""
        rows = torch.from_numpy(local)
        elapsed = torch.from_numpy(t - self.clock[local])
        self.dadao[rows] = dadao.propagate(self.dadao[rows], elapsed, self._constants())
        self.clock[local] = t
        self.state.numer[rows] = self.dadao[rows, dadao.X].float()

    def _dadao_level(self, steps: np.ndarray, pairs: np.ndarray, cross: np.ndarray,
                     times: LevelTimes) -> None:
        self._chi1_star = times.chi1_star
        c = self._constants()
        if steps.size:  # computation events: ODE to t, then the gradient jump
            local = self.trainer.local(steps).numpy()
            self._advance(local, times.steps)
            rows = torch.from_numpy(local)
            grads = self._gradients(steps, local)
            self.dadao[rows] = dadao.gradient_jump(self.dadao[rows], grads, c)
            self.state.numer[rows] = self.dadao[rows, dadao.X].float()
        if pairs.size:  # communication events with both ends here
            ends = np.concatenate([self.trainer.local(pairs[:, 0]).numpy(),
                                   self.trainer.local(pairs[:, 1]).numpy()])
            k = pairs.shape[0]
            self._advance(ends, np.concatenate([times.pairs, times.pairs]))
            rows = torch.from_numpy(ends)
            sent = dadao.message(self.dadao[rows])
            received = torch.cat([sent[k:], sent[:k]])
            self.dadao[rows] = dadao.comm_jump(self.dadao[rows], received, c)
        if cross.size:  # own ends of cross-pool events: ODE to t; the jump waits for the row
            self._advance(self.trainer.local(cross[:, 0]).numpy(), times.cross)
        self._pending = cross

    def _gradients(self, ids: np.ndarray, local: np.ndarray) -> torch.Tensor:
        """Each peer's k-th gradient is taken on the k-th minibatch of its own stream (the
        batches plain asynchronous gossip's k-th step uses)."""
        counters = self._step_counts[local]
        keys = splitmix64(self.seeds.client_keys("async_step", 0, ids) ^ counters)
        self._step_counts[local] += np.uint64(1)
        return self.trainer.gradients(self.state.rows(torch.from_numpy(local)), ids, keys)

    def _one_step(self, ids: np.ndarray) -> None:
        """Each peer's k-th asynchronous step uses the k-th minibatch of its own stream."""
        local = np.searchsorted(self.client_ids, ids)
        counters = self._step_counts[local]
        keys = splitmix64(self.seeds.client_keys("async_step", 0, ids) ^ counters)
        self._step_counts[local] += np.uint64(1)
        rows = torch.from_numpy(local)
        out, _ = self.trainer.local_training(self.state.rows(rows), ids, 0, keys=keys,
                                             max_steps=1, momentum=self._momentum_rows(rows))
        self.state.step(rows, out.deltas)
        self._keep_momentum(rows, out)

    def _momentum_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        return None if self.momentum is None else self.momentum[rows]

    def _keep_momentum(self, rows: torch.Tensor, out) -> None:
        if self.momentum is not None:
            self.momentum.put(rows, out.momentum)

    def _finish_cross(self, imported: tuple[Export, ...]) -> None:
        pending = self._pending
        if pending is None or not pending.size:
            return
        ids = np.concatenate([e[0] for e in imported])
        models = torch.from_numpy(np.concatenate([e[1] for e in imported]))
        mass = torch.from_numpy(np.concatenate([e[2] for e in imported]))
        at = torch.from_numpy(_positions(ids, pending[:, 1]))
        if self.dadao is not None:  # DADAO: the partners' y + z (float64), at the same time
            rows = self.trainer.local(pending[:, 0])
            self.dadao[rows] = dadao.comm_jump(self.dadao[rows], models[at], self._constants())
            self._pending = None
            return
        self.state.average_with(self.trainer.local(pending[:, 0]), models[at], mass[at])
        self._pending = None

    def set_models(self, models: np.ndarray) -> None:
        """Every peer takes `models` ([P]: one model for all, e.g. a global merge; or
        [n_local, P]: one row each); push-sum masses reset to 1; DADAO's x too."""
        self.state.set_all(torch.from_numpy(np.array(models, dtype=np.float32)))
        if self.dadao is not None:
            self.dadao[:, dadao.X] = self.state.numer.double()

    def export(self, wanted: list[np.ndarray], publish: bool = True):
        """No work: the rows each pool needs for a gossip step (as train_peers returns them;
        with compressed gossip, after a synchronous step's publication unless not `publish`)."""
        return (None, *self._exports(wanted, publish))

    def all_models(self) -> np.ndarray:
        return self.models().numpy()

    def models_of(self, peer_ids: np.ndarray) -> np.ndarray:
        """[len(peer_ids), P]: the de-biased models of some of the block's peers."""
        return self.state.rows(self.trainer.local(peer_ids)).numpy()

    def evaluate_peers(self, peer_ids: np.ndarray, mean_model: np.ndarray) -> PeerScores:
        z = self.state.rows(self.trainer.local(peer_ids))
        scores = [(*self.evaluator(row), None)[:3] for row in z]  # (loss, accuracy, return)
        loss, accuracy, returns = (_column(c) for c in zip(*scores, strict=True)) \
            if scores else (np.zeros(0),) * 3
        dist = torch.linalg.vector_norm(z.double() - torch.from_numpy(np.array(mean_model)),
                                        dim=1) ** 2
        return PeerScores(peer_ids, loss, accuracy, dist.numpy(), returns)

    def _exports(self, wanted: list[np.ndarray], publish: bool = True,
                 accelerated: bool = False) -> list[Export]:
        """The rows each pool reads next: the models, or with compressed gossip the public
        copies, after this step's compressed difference is published (`publish`), or in
        DADAO's asynchronous levels (`accelerated`) its messages y + z."""
        if self.public is not None and publish:
            self._publish()
        rows = self.state.numer if self.public is None else self.public.rows
        if accelerated:  # DADAO's message: y + z
            rows = dadao.message(self.dadao)
        out = []
        for ids in wanted:
            local = self.trainer.local(ids)
            out.append((ids, rows[local].numpy(), self.state.mass[local].numpy()))
        return out

    def _publish(self, rows: torch.Tensor | None = None) -> None:
        """CHOCO-SGD's message: q_i = C(x_i - x_hat_i); x_hat_i += q_i (every neighbour of i
        adds the same q_i to its copy; an unbiased C is scaled by 1 / (1 + omega)). Every
        peer, keyed per (step, peer); or (asynchronous wake-ups) only `rows`, keyed per
        (peer, its own count of messages)."""
        if rows is None:
            keys = self.seeds.client_keys("choco", self._published, self.client_ids)
            self._published += 1
            q = self.compressor.compress(self.state.numer - self.public.rows, keys).values
            self.public.rows += self.contraction * q
            return
        local = rows.numpy()
        ids = self.client_ids[local]
        keys = splitmix64(self.seeds.client_keys("choco_async", 0, ids)
                          ^ self._messages[local])
        self._messages[local] += np.uint64(1)
        q = self.compressor.compress(self.state.numer[rows] - self.public.rows[rows], keys)
        self.public.rows[rows] += self.contraction * q.values

    def _neighbourhood(self, plan: MixPlan, imported: list[Export],
                       own: torch.Tensor | None = None) -> Neighbourhood:
        """Gather own (default: the models) and imported rows in global id order (pool blocks
        are contiguous id ranges) and turn the CSR rows into padded [n, D] slots."""
        parts, received = [], iter(imported)
        for q, ids in enumerate(plan.imports):
            if q == plan.pool:
                parts.append((self.client_ids, self.state.numer if own is None else own,
                              self.state.mass))
            elif ids.size:
                ids, models, mass = next(received)
                parts.append((ids, torch.from_numpy(np.array(models)),
                              torch.from_numpy(np.array(mass))))
        gathered = np.concatenate([p[0] for p in parts])
        models = torch.cat([p[1] for p in parts])
        mass = torch.cat([p[2] for p in parts])
        index, weights, valid = _padded(plan, np.searchsorted(gathered, plan.cols))
        own = torch.from_numpy(np.searchsorted(gathered, self.client_ids))
        index = torch.where(valid, index, own[:, None])
        nb = Neighbourhood(models, mass, index, weights, valid, own, layers=self.layers,
                           ids=torch.from_numpy(gathered), state=self.policy_state,
                           evidence=self._evidence())
        if self.peers.forge is not None and self.peers.byzantine.size:
            byz = torch.from_numpy(np.isin(gathered, self.peers.byzantine))
            nb = nb._replace(forged=self.peers.forge(nb, byz))
        return nb

    def _evidence(self) -> Evidence | None:
        batch = self.peers.consensus.evidence
        if not batch:
            return None
        x, y, mask = self.trainer.evidence(self.client_ids, self._judged, batch)
        return Evidence(x, y, mask, self.trainer.predict)

    def _stats(self, shift: np.ndarray | None, mix_s: float) -> MixStats:
        z = self.models() if bool(self.honest.all()) else self.models()[self.honest]
        if shift is not None:
            z -= torch.from_numpy(np.array(shift, dtype=np.float32))
        squared = torch.linalg.vector_norm(z, dim=1).double() ** 2
        ids = self.client_ids[self.honest.numpy()]
        return MixStats(ids, squared.numpy(),
                        self.trainer.partial_sums(z, torch.from_numpy(ids)), mix_s)


def _positions(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each of `wanted` sits in the unsorted, unique `ids`."""
    order = np.argsort(ids, kind="stable")
    return order[np.searchsorted(ids[order], wanted)]


def _padded(plan: MixPlan, local_cols: np.ndarray):
    """CSR rows -> [n, D] slot tensors (index into the gathered models, weight, valid)."""
    lengths = np.diff(plan.crow)
    n, d = lengths.size, int(lengths.max()) if lengths.size else 0
    slot = np.arange(plan.cols.size) - np.repeat(plan.crow[:-1], lengths)
    row = np.repeat(np.arange(n), lengths)
    index = np.zeros((n, d), dtype=np.int64)
    weights = np.zeros((n, d), dtype=np.float32)
    valid = np.zeros((n, d), dtype=bool)
    index[row, slot], weights[row, slot], valid[row, slot] = local_cols, plan.vals, True
    return torch.from_numpy(index), torch.from_numpy(weights), torch.from_numpy(valid)
