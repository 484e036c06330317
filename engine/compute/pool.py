"""ClientPool: owns a shard of clients (their rows in the client data store) and trains the selected
ones.

A plain Python class: the Ray backend wraps it in an actor, the inline backend calls it
in-process. Pools never choose clients; they train whom they are told to.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from engine.compute.rl import EnvTrainer
from engine.compute.shards import ShardIds
from engine.compute.state import Checkpointed, LazyRows
from engine.compute.training import (
    DiagonalFisher,
    LocalSGD,
    Trained,
    _batch_loss,
    _padded_as_zeros,
    batch_plan,
    pin_torch_arithmetic,
    step_budget,
    step_budgets,
)
from engine.core.params import ParamSpec, flatten_module
from engine.core.seeds import SeedTree, keyed_permutations
from engine.core.tree import TreeSums
from engine.core.updates import Updates
from policies.compression import Compressor, ControlledUplink, none, with_error_feedback
from policies.streaming import Streaming, fragment_bounds, fragment_of_round, quantized
from scenarios.environments import EnvShard
from scenarios.models import ModelSpec
from scenarios.store import ranges
from scenarios.task import Shard

# Clients with their own starting points (peers) train in blocks of this many: the vmap
# executor's working set then stays in cache (measured on W2's MLP, 2 threads, plain vmap:
# 1,200 peer-updates/s in one block of 1000, 3,100 in blocks of 250). A client's result does
# not depend on its block (pinned arithmetic), so neither do the bits.
TRAIN_BLOCK = 256


@dataclass(frozen=True)
class PoolSpec:
    model: ModelSpec
    hp: LocalSGD
    executor: Callable  # an EXECUTORS entry: (model, spec) -> executor
    seed: int
    compressor: Compressor = none()  # applied to each client's delta
    error_feedback: bool = True  # keep each client's compression residual
    fisher: bool = False  # clients also return their local model's diagonal Fisher
    label_counts: bool = False  # clients also return their training labels per class
    streaming: Streaming | None = None  # Streaming DiLoCo: workers keep their parameters
    uplink: ControlledUplink | None = None  # SCALLION / SCAFCOM: compress SCAFFOLD's uplink

    @property
    def keeps_client_state(self) -> bool:
        """Whether client pools keep rows per client across rounds (SCAFFOLD's controls,
        error feedback's residuals, Streaming DiLoCo's workers): a client then trains in
        the pool that owns it."""
        return (self.hp.scaffold or self.streaming is not None
                or (not self.compressor.lossless and self.error_feedback))


@dataclass(frozen=True)
class PoolResult:
    updates: Updates  # with each client's SGD steps in `updates.steps`
    update_norms: torch.Tensor  # [k] L2 norm of each client's delta
    train_s: float  # wall seconds of this pool's call
    control_sums: TreeSums | None = None  # SCAFFOLD: this pool's part of sum_i delta c_i
    control_deltas: torch.Tensor | None = None  # SCAFFOLD, asked for: delta c_i per update
    nonfinite: np.ndarray = field(  # ids whose update had a NaN or inf: dropped
        default_factory=lambda: np.zeros(0, np.int64))
    pool: int = -1  # the pool that trained them (set by the backend)

    # Pickled as numpy arrays: Ray ships those as zero-copy buffers, while a pickled torch
    # tensor is copied through bytes (measured: 27 ms vs 11 ms for two 1.9 MB results).
    def __getstate__(self) -> dict:
        sums = self.updates.weighted_sums
        return {"columns": [_array(c) for c in self.updates.per_client()],
                "sums": _sums_arrays(sums),
                "norms": self.update_norms.numpy(),
                "train_s": self.train_s, "controls": _sums_arrays(self.control_sums),
                "control_rows": _array(self.control_deltas), "nonfinite": self.nonfinite,
                "pool": self.pool}

    def __setstate__(self, state: dict) -> None:
        sums = _sums_tensors(state["sums"])
        updates = Updates(*map(_tensor, state["columns"]), weighted_sums=sums)
        object.__setattr__(self, "control_sums", _sums_tensors(state["controls"]))
        object.__setattr__(self, "control_deltas", _tensor(state["control_rows"]))
        object.__setattr__(self, "updates", updates)
        object.__setattr__(self, "update_norms", _tensor(state["norms"]))
        object.__setattr__(self, "train_s", state["train_s"])
        object.__setattr__(self, "nonfinite", state["nonfinite"])
        object.__setattr__(self, "pool", state["pool"])


def _sums_arrays(sums: TreeSums | None) -> list[np.ndarray] | None:
    return None if sums is None else [c.numpy() for c in sums]


def _sums_tensors(arrays: list[np.ndarray] | None) -> TreeSums | None:
    return None if arrays is None else TreeSums(*map(_tensor, arrays))


def _array(column: torch.Tensor | None) -> np.ndarray | None:
    return None if column is None else column.numpy()


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    """A tensor over `array` (copied only if read-only, as buffers from the object store are)."""
    if array is None:
        return None
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [C]: rows of x [C, P] without NaN or inf: a row's largest magnitude is finite
    exactly then (amax propagates NaN); 0.08 ms instead of isfinite(x).all's 0.9 ms for
    W1's [50, 9610]."""
    return torch.isfinite(x.abs().amax(dim=1))


# A shard whose training rows take at most this many bytes reads them once into memory; a
# bigger one reads, on each call, only the rows of the clients it trains from the
# memory-mapped store. The bits are the same either way (a test checks it).
RESIDENT_BYTES = 256 << 20


class ShardTrainer(ShardIds):
    """A shard of clients (where their rows are in the client data store) and the executor
    that trains any of them: what a client pool and a peer pool share. Holds no per-client
    state across rounds."""

    def __init__(self, spec: PoolSpec, shard: Shard) -> None:
        # torch.func imports torch._dynamo on its first call (about a second): pay it when a
        # pool is built, not in its first timed round (nor in commands that only check a
        # config, which therefore never import it)
        import torch._dynamo  # noqa: F401

        pin_torch_arithmetic()
        self.spec, self.shard = spec, shard
        self.client_ids = shard.client_ids
        self._reader = shard.store.open()
        self._last: tuple[np.ndarray, tuple] | None = None  # the last rows read, by id
        self._resident = None
        if self._reader.num_rows * 4 * shard.store.num_features <= RESIDENT_BYTES:
            every = np.arange(shard.store.offsets.size - 1)
            x, y = shard.read(self._reader, every)
            self._resident = (torch.from_numpy(x), torch.from_numpy(y))
        self.seeds = SeedTree(spec.seed)
        self.model = spec.model.build()
        self.param_spec = ParamSpec.of(self.model)
        self.executor = spec.executor(self.model, self.param_spec)
        self._gradient = vmap(grad(_batch_loss(self.model, self.param_spec)))

    def rows(self, client_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(x, y, first): rows holding those of clients `client_ids` (any clients, not only
        the shard's), and each one's first row in them (client j's rows are first[j]:first[j]
        + its size)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        if self._resident is not None:
            return *self._resident, self.shard.store.offsets[ids]
        if self._last is None or not np.array_equal(self._last[0], ids):
            x, y = self.shard.read(self._reader, ids)
            sizes = self.shard.sizes(ids)
            self._last = (ids.copy(), (torch.from_numpy(x), torch.from_numpy(y),
                                       np.cumsum(sizes) - sizes))
        return self._last[1]

    def label_counts(self, client_ids: np.ndarray) -> torch.Tensor:
        """[k, classes] int64: each client's training labels per class (FedDisco's input)."""
        ids = np.asarray(client_ids, dtype=np.int64)
        _, y, first = self.rows(ids)
        sizes, classes = self.shard.sizes(ids), self.spec.model.num_classes
        owner = np.repeat(np.arange(ids.size), sizes)
        labels = y.numpy()[ranges(first, sizes)]
        return torch.from_numpy(np.bincount(owner * classes + labels,
                                            minlength=ids.size * classes)
                                .reshape(-1, classes))

    def local_training(self, params: torch.Tensor, client_ids: np.ndarray, round_idx: int,
                       keys: np.ndarray | None = None, max_steps: int | None = None,
                       momentum: torch.Tensor | None = None,
                       correction: torch.Tensor | None = None,
                       budgets: np.ndarray | None = None) -> tuple[Trained, np.ndarray]:
        """Local SGD of `client_ids` from `params` ([P] shared or [C, P] one row per client)
        and momentum buffers `momentum` ([C, P], zeros if None): `local_epochs` shuffled
        epochs (keyed by round, or by `keys`), or their first `max_steps` batches, cut to
        `budgets` (default: the config's step budget). Returns the executor's output and the
        clients' sample counts."""
        counts = self.shard.sizes(client_ids)
        x, y, first = self.rows(client_ids)
        if keys is None:
            keys = self.seeds.client_keys("shuffle", round_idx, client_ids)
        plan = batch_plan(keys, first, counts, self.spec.hp)[:, :max_steps]
        if budgets is None:
            budgets = step_budgets(self.spec.hp, self.seeds, client_ids, round_idx)
        plan = step_budget(plan, budgets)
        if params.dim() == 1 or params.shape[0] <= TRAIN_BLOCK:
            return self.executor(params, x, y, plan, self.spec.hp, momentum,
                                 correction), counts
        blocks = [self.executor(params[lo: lo + TRAIN_BLOCK], x, y,
                                plan[lo: lo + TRAIN_BLOCK], self.spec.hp,
                                *(None if t is None else t[lo: lo + TRAIN_BLOCK]
                                  for t in (momentum, correction)))
                  for lo in range(0, params.shape[0], TRAIN_BLOCK)]
        return Trained(*(None if parts[0] is None else torch.cat(parts) for parts in zip(
            *((b.deltas, b.losses, b.steps, b.momentum) for b in blocks), strict=True))), counts


    def gradients(self, params: torch.Tensor, client_ids: np.ndarray,
                  keys: np.ndarray) -> torch.Tensor:
        """[C, P]: each client's minibatch gradient of its loss at its row of `params`, on
        the first batch of its epoch keyed by `keys` (what one SGD step of
        `local_training(..., keys=keys, max_steps=1)` would use; no optimizer applied)."""
        x, y, first = self.rows(client_ids)
        plan = batch_plan(keys, first, self.shard.sizes(client_ids), self.spec.hp)[:, 0]
        mask = plan >= 0
        xb, yb = _padded_as_zeros(x[plan.clamp(min=0)], y[plan.clamp(min=0)], mask)
        return self._gradient(params, xb, yb, mask.float())

    def evidence(self, client_ids: np.ndarray, key: int, batch: int):
        """(x [n, B, ...], y [n, B], mask [n, B]): up to `batch` of each client's own samples,
        a keyed draw per (key, client) without replacement."""
        counts = self.shard.sizes(client_ids)
        x, y, first = self.rows(client_ids)
        keys = self.seeds.client_keys("evidence", key, client_ids)
        picks = keyed_permutations(keys, counts, max(int(counts.max(initial=0)), batch))
        picks = picks[:, :batch]
        mask = picks >= 0
        rows = torch.from_numpy(np.where(mask, picks + first[:, None], 0))
        mask = torch.from_numpy(mask)
        keep = mask.view(*mask.shape, *([1] * (x.dim() - 1)))
        return torch.where(keep, x[rows], 0.0), torch.where(mask, y[rows], 0), mask

    def predict(self, models: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """logits [n, B, C]: row i's model (flat [n, P]) on row i's inputs x [n, B, ...]."""
        if getattr(self, "_predict", None) is None:
            model, spec = self.model, self.param_spec
            self._predict = vmap(lambda flat, xb: functional_call(model, spec.unflatten(flat),
                                                                  (xb,)))
        with torch.no_grad():
            return self._predict(models, x)


class WorkerModels(LazyRows):
    """Streaming DiLoCo's workers (Douillard et al., 2025; policies/streaming.py): each
    client keeps its own parameters across rounds (rows, with `known` false until it first
    trains: it then starts from the global model)."""

    def __init__(self, num_clients: int, num_params: int) -> None:
        super().__init__(num_clients, num_params)
        self.known = torch.zeros(num_clients, dtype=torch.bool)

    def zero_(self) -> None:
        super().zero_()
        self.known.zero_()

    def start(self, local: torch.Tensor, params: torch.Tensor, r: int,
              s: Streaming) -> torch.Tensor:
        """[C, P]: each worker's own parameters (the global model if it has none yet), with
        the fragment whose outer step ended round r - 1 - tau merged in:
        own <- alpha own + (1 - alpha) global."""
        known = self.known[local][:, None]
        own = torch.where(known, self[local], params[None, :])
        done = r - 1 - s.tau
        if done >= 0:
            lo, hi = fragment_bounds(params.numel(), s.fragments,
                                     fragment_of_round(done, s.fragments))
            merged = s.alpha * own[:, lo:hi] + (1 - s.alpha) * params[None, lo:hi]
            own[:, lo:hi] = torch.where(known, merged, own[:, lo:hi])
        return own

    def trained(self, local: torch.Tensor, params: torch.Tensor, start: torch.Tensor,
                deltas: torch.Tensor, r: int, s: Streaming, finite: torch.Tensor
                ) -> torch.Tensor:
        """Keep each worker's new parameters (finite ones); return what it sends: on round
        r's fragment, own - global as sent (quantised to `bits`), zero elsewhere."""
        self.put(local, start + deltas, keep=finite)
        self.known[local[finite]] = True
        lo, hi = fragment_bounds(params.numel(), s.fragments, fragment_of_round(r, s.fragments))
        sent = torch.zeros_like(deltas)
        sent[:, lo:hi] = quantized((start[:, lo:hi] - params[None, lo:hi]) + deltas[:, lo:hi],
                                   s.bits)
        return sent


def make_trainer(spec: PoolSpec, shard: Shard | EnvShard) -> ShardTrainer | EnvTrainer:
    """A shard's trainer: local SGD on its clients' rows, or PPO in their environments."""
    if isinstance(shard, EnvShard):
        return EnvTrainer(spec.model, shard, spec.hp, spec.seed)
    return ShardTrainer(spec, shard)


class ClientPool(Checkpointed):
    """A server's clients: trains the selected ones of its shard each round, keeping each
    client's SCAFFOLD control variate and compression residual as components."""

    def __init__(self, spec: PoolSpec, shard: Shard) -> None:
        self.trainer = t = make_trainer(spec, shard)
        self.spec, self.client_ids, self.seeds = spec, shard.client_ids, t.seeds
        self.fisher = DiagonalFisher(t.model, t.param_spec) if spec.fisher else None
        n, size = self.client_ids.size, t.param_spec.size
        # SCAFFOLD's client control variates c_i, one row per client of the shard
        self.controls = LazyRows(n, size) if spec.hp.scaffold else None
        # update compression, with error feedback's residual e_i per client of the shard
        self.compressor = None if spec.compressor.lossless else spec.compressor
        self.residuals = LazyRows(n, size) if (self.compressor is not None and spec.error_feedback
                                               and spec.uplink is None) else None
        # SCAFCOM's momentum v_i per client (SCALLION and SCAFCOM keep no residual: c_i is
        # their memory of what was sent)
        self.uplink_momentum = LazyRows(n, size) if (
            spec.uplink is not None and spec.uplink.momentum) else None
        # Streaming DiLoCo: each worker's own parameters, and whether it has trained yet
        self.workers = None if spec.streaming is None else WorkerModels(n, size)
        self._warm_up()
        for state in (self.controls, self.residuals, self.uplink_momentum, self.workers):
            if state is not None:
                state.zero_()  # the warm-up round is not part of the run

    def _warm_up(self) -> None:
        """Train a few clients once and discard the result (pools keep no client state yet),
        so the first timed round does not pay one-off costs (lazy imports, allocator growth)."""
        self.train(flatten_module(self.trainer.model), self.client_ids[:32], round_idx=0)

    def ready(self) -> int:
        """Number of clients owned; a cheap call to wait for construction to finish."""
        return int(self.client_ids.size)

    def local_training(self, *args, **kwargs) -> tuple[Trained, np.ndarray]:
        """The shard's local SGD (ShardTrainer.local_training)."""
        return self.trainer.local_training(*args, **kwargs)

    def train(self, params: torch.Tensor | np.ndarray, client_ids: np.ndarray, round_idx: int,
              pre_reduce: bool = False, control: np.ndarray | None = None,
              budgets: np.ndarray | None = None, control_rows: bool = False,
              span: tuple[int, int] | None = None) -> PoolResult:
        """One round of local training for `client_ids` (the shard's, or with `span`, any ids
        in span[0]..span[1]-1 where the pool keeps no client state). With
        `pre_reduce`, return partial tree sums of weights * deltas instead of the deltas.
        With SCAFFOLD, `control` is the server's control variate c (zeros if None), and
        `control_rows` returns each update's delta c_i too (an asynchronous server applies
        them as it aggregates); `budgets` are the clients' own step counts (anarchic
        participation)."""
        start = time.perf_counter()
        t = self.trainer
        params = torch.as_tensor(np.array(params, copy=True))  # private, writable [P]
        local = t.local(client_ids)
        c = None if self.controls is None else (
            torch.zeros_like(params) if control is None else torch.as_tensor(np.array(control)))
        correction = None if c is None else c[None, :] - self.controls[local]
        origin = params if self.workers is None else self.workers.start(
            local, params, round_idx, self.spec.streaming)
        out, counts = t.local_training(origin, client_ids, round_idx, correction=correction,
                                       budgets=budgets)
        finite, checked = finite_rows(out.deltas), out.deltas
        if self.workers is not None:  # the worker's outer gradient on the round's fragment
            sent = self.workers.trained(local, params, origin, out.deltas, round_idx,
                                        self.spec.streaming, finite)
            out = dataclasses.replace(out, deltas=sent)
        if self.fisher is not None:
            x, _, first = t.rows(client_ids)
            fisher = self.fisher(params + out.deltas, x, first, counts)
        else:
            fisher = None
        if self.spec.uplink is None:
            moved = None if c is None else self._update_controls(local, c, out, finite)
            deltas = self._compress(local, out.deltas, client_ids, round_idx, finite)
        else:
            deltas, moved = self._controlled_uplink(local, c, out, finite, client_ids, round_idx)
        rows = moved.clone() if control_rows and moved is not None else None
        control_sums = None if moved is None else t.partial_sums(  # merges into `moved`
            moved, torch.from_numpy(np.array(client_ids, dtype=np.int64)), span)
        if deltas is not checked:  # what is sent is not the deltas checked above
            finite &= finite_rows(deltas)
        updates = Updates(
            deltas=deltas,
            weights=torch.from_numpy(counts.astype(np.float32)),
            client_ids=torch.from_numpy(np.array(client_ids, dtype=np.int64)),
            losses=out.losses.float(),
            num_samples=torch.from_numpy(counts.astype(np.int64)),
            steps=out.steps.to(torch.int64),
            label_counts=t.label_counts(client_ids) if self.spec.label_counts else None,
            fisher=fisher,
        )
        nonfinite = np.asarray(client_ids, dtype=np.int64)[~finite.numpy()]
        if nonfinite.size:  # excluded from aggregation; the loop logs them
            kept = torch.nonzero(finite).squeeze(1)
            updates = updates.take(kept)
            rows = None if rows is None else rows[kept]
        norms = torch.linalg.vector_norm(updates.deltas, dim=1)
        if pre_reduce:
            updates = updates._replace(deltas=None, weighted_sums=t.partial_sums(
                updates.deltas.mul_(updates.weights[:, None]), updates.client_ids, span))
        return PoolResult(updates, norms, time.perf_counter() - start, control_sums, rows,
                          nonfinite)

    def _compress(self, local: torch.Tensor, deltas: torch.Tensor, client_ids: np.ndarray,
                  round_idx: int, finite: torch.Tensor) -> torch.Tensor:
        """What each client uploads: its delta compressed, with error feedback when configured
        (c = C(delta + e_i), e_i <- delta + e_i - c); keyed per (round, client). A client whose
        delta is not finite keeps its residual (its update is dropped)."""
        if self.compressor is None:
            return deltas
        keys = self.seeds.client_keys("compress", round_idx, client_ids)
        if self.residuals is None:
            return self.compressor.compress(deltas, keys).values
        sent, residual, _ = with_error_feedback(self.compressor, deltas, self.residuals[local],
                                                keys)
        self.residuals.put(local, residual, keep=finite & finite_rows(residual))
        return sent

    def _control_drift(self, c: torch.Tensor, out: Trained,
                       finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SCAFFOLD option II's change of c_i: -c + (x - y_i) / (K_i lr), the client's mean
        corrected gradient minus c_i (rows of clients without a step, or with a non-finite
        delta: 0), and the mask of the other rows."""
        steps = out.steps.to(out.deltas.dtype)[:, None]
        ok = (steps > 0) & finite[:, None]
        drift = torch.where(ok, -c[None, :] - out.deltas / (steps.clamp(min=1) * self.spec.hp.lr),
                            0.0)
        return drift, ok

    def _update_controls(self, local: torch.Tensor, c: torch.Tensor, out: Trained,
                         finite: torch.Tensor) -> torch.Tensor:
        """SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K_i lr), kept in the pool; returns
        the rows c_i+ - c_i (clients without a step, or with a non-finite delta: 0)."""
        moved, _ = self._control_drift(c, out, finite)
        self.controls.add(local, moved)
        return moved

    def _controlled_uplink(self, local: torch.Tensor, c: torch.Tensor, out: Trained,
                           finite: torch.Tensor, client_ids: np.ndarray,
                           round_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """SCALLION / SCAFCOM (policies/compression.py ControlledUplink): each client sends
        d_i, the compressed change of its control, instead of its delta; the server decodes
        the delta as -K_i lr (c + d_i) (it knows c and K_i), which is what this returns with
        the rows of c_i's change (alpha d_i). A client without a step sends nothing; one with
        a non-finite delta keeps it (it is dropped) and its c_i and v_i."""
        drift, ok = self._control_drift(c, out, finite)
        keys = self.seeds.client_keys("compress", round_idx, client_ids)
        v = None if self.uplink_momentum is None else self.uplink_momentum[local]
        sent, moved, v, _ = self.spec.uplink.message(self.spec.compressor, drift,
                                                     self.controls[local], v, keys)
        moved = torch.where(ok, moved, 0.0)
        self.controls.add(local, moved)
        if v is not None:
            self.uplink_momentum.put(local, v, keep=ok[:, 0])
        steps = out.steps.to(out.deltas.dtype)[:, None]
        deltas = torch.where(ok, -(steps * self.spec.hp.lr) * (c[None, :] + sent), out.deltas)
        return deltas, moved
