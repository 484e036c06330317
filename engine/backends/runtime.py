"""Backends: the only module that talks to Ray.

`RayPools` builds each pool (a ClientPool or PeerPool) inside an actor (a `PoolHost`), places
its shard once through the object store, puts the global model once per round and makes one
call per pool per round. `InlinePools` calls the same pool objects in-process. Both return the
pools' results in pool order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from engine.compute.pool import ClientPool, PoolResult, PoolSpec
from engine.compute.training import pin_torch_arithmetic
from engine.core.errors import ConfigError, PoolDied
from engine.core.parallel import ChunkMap, serial_map
from engine.core.tree import ALL_IDS
from scenarios.task import FederatedTask


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run (never what is computed: results do not depend on these)."""

    backend: str = "ray"  # "ray" | "inline"
    pools: int | None = None  # default: one per cluster CPU (ray), 1 (inline)
    address: str | None = None  # an existing Ray cluster, e.g. "auto" or "host:6379"
    cpus: int | None = None  # CPUs this run may use (a sweep's share); default: the cluster's
    reuse_actors: bool = False  # ray: keep the pool actors for the next run of this process
    checkpoint_every: int = 50  # rounds between checkpoints (0: only at the start and on stop)
    max_restarts: int = 3  # pools replaced in a run before it fails


class Pools(Protocol):
    num_pools: int
    bounds: np.ndarray  # [num_pools + 1] client id boundaries of the shards
    chunk_map: ChunkMap  # how holistic aggregation kernels run (engine/core/parallel.py)

    def train(self, params: torch.Tensor, selected: np.ndarray, round_idx: int,
              pre_reduce: bool, control: torch.Tensor | None = None,
              budgets: np.ndarray | None = None,
              control_rows: bool = False) -> list[PoolResult]: ...

    def map(self, method: Callable, args: list[tuple], num_returns: int = 1) -> list:
        """Pool p runs method(pool, *args[p]) (`method`: a pool class's method, e.g.
        PeerPool.gossip); handles of the results, one per pool (a list of them per pool if
        num_returns > 1)."""
        ...

    def get(self, handles: list) -> list: ...

    def snapshot(self) -> list[bytes]:
        """Every pool's state (engine/compute/state.py Checkpointed), in pool order."""
        ...

    def restore(self, states: list[bytes]) -> None: ...

    def restart(self, pool: int) -> None:
        """Replace pool `pool`'s dead actor by a new one built from the same shard (its state
        is then restored from a checkpoint)."""
        ...

    def close(self) -> None: ...


def shard_bounds(num_clients: int, num_pools: int) -> np.ndarray:
    """Contiguous, near-equal blocks of client ids: pool p owns bounds[p]..bounds[p+1]-1."""
    return np.linspace(0, num_clients, num_pools + 1).round().astype(np.int64)


def pool_of(bounds: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The pool that owns each id."""
    return np.searchsorted(bounds, ids, side="right") - 1


def split_by_pool(selected: np.ndarray, bounds: np.ndarray) -> list[np.ndarray]:
    cuts = np.searchsorted(selected, bounds[1:-1])
    return np.split(selected, cuts)


def balanced_split(selected: np.ndarray, sizes: np.ndarray, num_pools: int
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """A round's clients (sorted ids) cut into `num_pools` runs of consecutive ids holding
    near-equal numbers of training samples, and the id boundaries of the runs (run p's ids
    lie in bounds[p]..bounds[p+1]-1; the bounds tile 0..N, so the pools' partial sums of the
    fixed id tree are those of any other cut: the bits do not depend on it)."""
    weights = np.cumsum(sizes[selected])
    total = weights[-1] if weights.size else 0
    cuts = np.searchsorted(weights, total * np.arange(1, num_pools) / num_pools, side="right")
    first = np.append(selected, sizes.size)[cuts]  # the first id of each later run
    last = np.append(-1, selected)[cuts]  # the last id of each earlier run (-1: none)
    bounds = [0, *(_aligned(int(a), int(b)) for a, b in zip(last, first, strict=True)),
              sizes.size]
    return np.split(selected, cuts), np.array(bounds, dtype=np.int64)


def _aligned(lo: int, hi: int) -> int:
    """The id in (lo, hi] with the most trailing zero bits: a boundary between two pools'
    runs there leaves both the fewest nodes of the id tree to send (W1: 10.7 -> 6.8 vectors
    a round for two pools; a result's every 100 KB costs ~0.16 ms of Ray's return here)."""
    for bits in range(max(hi, 1).bit_length(), -1, -1):
        cut = (hi >> bits) << bits
        if cut > lo:
            return cut
    return hi


class RoundSplit:
    """How a round's clients go to pools: by the shard that owns them (their per-client state
    lives there), or, where pools keep no state across rounds, in runs of consecutive ids
    with equal samples (any pool reads any client's rows from the store)."""

    def __init__(self, task, spec: PoolSpec, pool_class: type, bounds: np.ndarray) -> None:
        self.bounds = bounds
        self.sizes = (task.client_sizes if isinstance(task, FederatedTask) and
                      pool_class is ClientPool and not spec.keeps_client_state else None)

    def __call__(self, selected: np.ndarray, budgets: np.ndarray | None
                 ) -> list[tuple[np.ndarray, np.ndarray | None, tuple[int, int]]]:
        """(ids, their budgets, the id span they lie in) for each pool, in pool order; the last
        span runs to the tree's end, so its pool completes the nodes past N too."""
        if self.sizes is None:
            parts, bounds = split_by_pool(selected, self.bounds), self.bounds
        else:
            parts, bounds = balanced_split(selected, self.sizes, len(self.bounds) - 1)
        spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        spans[-1] = (spans[-1][0], ALL_IDS[1])  # no client id lies past the last pool's
        return list(zip(parts, _split_like(budgets, parts), spans, strict=True))


def _split_like(values: np.ndarray | None, parts: list[np.ndarray]) -> list:
    """`values` aligned with the concatenated parts, cut the same way (Nones without)."""
    if values is None:
        return [None] * len(parts)
    return np.split(values, np.cumsum([p.size for p in parts])[:-1])


class InlinePools:
    def __init__(self, task: FederatedTask, spec: PoolSpec, num_pools: int,
                 pool_class: type[ClientPool] = ClientPool, extra: tuple = ()) -> None:
        self.num_pools = num_pools
        self.bounds = shard_bounds(task.num_clients, num_pools)
        self.chunk_map = serial_map
        self._pools = [pool_class(spec, task.shard(a, b), *extra)
                       for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]
        self._split = RoundSplit(task, spec, pool_class, self.bounds)

    def map(self, method, args, num_returns=1):
        """pool p runs method(pool, *args[p]); its result (a tuple if num_returns > 1)."""
        return [method(pool, *a) for pool, a in zip(self._pools, args, strict=True)]

    def get(self, handles):
        return list(handles)

    def snapshot(self) -> list[bytes]:
        return [pool.snapshot() for pool in self._pools]

    def restore(self, states: list[bytes]) -> None:
        for pool, state in zip(self._pools, states, strict=True):
            pool.restore(state)

    def restart(self, pool: int) -> None:
        raise RuntimeError("inline pools live in this process: they cannot die alone")

    def train(self, params, selected, round_idx, pre_reduce, control=None, budgets=None,
              control_rows=False):
        return [dataclasses.replace(pool.train(params, ids, round_idx, pre_reduce, control, b,
                                               control_rows, span), pool=p)
                for p, (pool, (ids, b, span)) in enumerate(zip(
                    self._pools, self._split(selected, budgets), strict=True)) if ids.size]

    def close(self) -> None:
        self._pools.clear()


class PoolHost:
    """A Ray actor that builds one pool and runs its methods: kept from one run to the next
    (RuntimeOptions.reuse_actors), a run pays for building its pool, not for starting a
    worker process and importing torch. Each run builds a fresh pool: no state carries over."""

    def __init__(self) -> None:
        self.pool = None

    def build(self, pool_class: type, spec: PoolSpec, shard, *extra) -> int:
        self.pool = None  # the last run's pool goes before the next one is built
        self.pool = pool_class(spec, shard, *extra)
        return self.pool.ready()

    def run(self, packed: bytes, *refs):
        """pool.method(*args), from `pack_call`'s bytes: the arguments Ray resolved (object
        refs) come as `refs`; a result asked for packed goes back pickled (one bytes value)."""
        method, args, pack_result = pickle.loads(packed)
        args = [refs[a.index] if isinstance(a, Slot) else a for a in args]
        out = getattr(self.pool, method)(*args)
        return pickle.dumps(out, protocol=5) if pack_result else out

    def release(self) -> None:
        self.pool = None

    def snapshot(self) -> bytes:
        return self.pool.snapshot()

    def restore(self, state: bytes) -> None:
        self.pool.restore(state)

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this host runs on (where its pool was placed)."""
        import ray

        return ray.get_runtime_context().get_node_id()


@dataclass(frozen=True)
class Slot:
    """In a packed call, the place of the argument that Ray passes as refs[index]."""

    index: int


def pack_call(method: str, args: tuple, pack_result: bool, ref_type: type) -> tuple:
    """The arguments of `PoolHost.run` for pool.method(*args): every argument pickled
    together into one bytes value, except object refs (`ref_type`), which stay Ray's
    arguments so Ray resolves them. Ray serialises each argument of a call on its own: a W1
    `train` call with its nine arguments cost 1.76 ms a round for two pools, as one bytes
    value 1.08 ms (no-op calls: 0.96 ms). A packed result (a pickled bytes value) comes back
    faster too where it is small (W1's partial sums: 1.64 -> 1.31 ms for two pools); a large
    one (every client's delta) is left to Ray, which ships numpy arrays without copies."""
    refs = [a for a in args if isinstance(a, ref_type)]
    slots = iter(range(len(refs)))
    args = [Slot(next(slots)) if isinstance(a, ref_type) else a for a in args]
    return (pickle.dumps((method, args, pack_result), protocol=5), *refs)


_HOSTS: dict[tuple[int, float], list] = {}  # (pools, CPUs each) -> idle PoolHost actors


def drop_kept_hosts() -> None:
    """Kill the idle hosts kept for reuse: they hold CPUs, so a run that cannot reuse them
    would otherwise wait forever for its own actors to be scheduled."""
    import ray

    while _HOSTS:
        for actor in _HOSTS.popitem()[1]:
            ray.kill(actor)


class RayPools:
    def __init__(self, task: FederatedTask, spec: PoolSpec, num_pools: int, cpus: int,
                 pool_class: type[ClientPool] = ClientPool, extra: tuple = (),
                 reuse: bool = False) -> None:
        import ray

        self._ray, self._reuse = ray, reuse
        self.num_pools = num_pools
        self.bounds = shard_bounds(task.num_clients, num_pools)
        self.chunk_map = RayChunkMap(workers=max(1, int(cpus)))
        self._split = RoundSplit(task, spec, pool_class, self.bounds)
        self._key = (num_pools, min(1.0, cpus / num_pools))
        kept = _HOSTS.pop(self._key, None) if reuse else None
        drop_kept_hosts()  # idle hosts of another layout hold the CPUs this run's actors need
        refs = (ray.put(spec), [ray.put(e) for e in extra],
                [ray.put(task.shard(a, b)) for a, b in zip(self.bounds[:-1], self.bounds[1:],
                                                             strict=True)])
        self._pool_class, self._refs = pool_class, refs  # to rebuild a pool whose actor died
        if kept is not None:
            try:
                self._build(kept, pool_class, *refs)
                return
            except ray.exceptions.RayActorError:  # a kept actor died (e.g. Ray restarted)
                pass
        self._build([self._host() for _ in range(num_pools)], pool_class, *refs)

    def _host(self):
        return self._ray.remote(PoolHost).options(
            num_cpus=self._key[1], runtime_env={"env_vars": POOL_ENV}).remote()

    def _build(self, hosts: list, pool_class: type, spec_ref, extra_refs, shard_refs) -> None:
        """Each host builds its pool (start-up is not part of round 0)."""
        self._actors = hosts
        try:
            self.get([h.build.remote(pool_class, spec_ref, shard, *extra_refs)
                      for h, shard in zip(hosts, shard_refs, strict=True)])
        except Exception:
            self.close()
            raise

    def train(self, params, selected, round_idx, pre_reduce, control=None, budgets=None,
              control_rows=False):
        params_ref, control_ref = self._shared(params), self._shared(control)
        work = [(p, actor, *part) for p, (actor, part) in enumerate(zip(
            self._actors, self._split(selected, budgets), strict=True)) if part[0].size]
        futures = [actor.run.remote(*pack_call("train", (params_ref, ids, round_idx, pre_reduce,
                                                           control_ref, b, control_rows, span),
                                               pre_reduce, self._ray.ObjectRef))
                   for _, actor, ids, b, span in work]
        return [dataclasses.replace(pickle.loads(res) if pre_reduce else res, pool=w[0])
                for w, res in zip(work, self.get(futures), strict=True)]

    def _shared(self, vector: torch.Tensor | None):
        """A per-round vector as every pool's call receives it: as numpy (Ray serialises it
        zero-copy, while pickling the torch tensor cost the driver ~15% of its CPU on W1); by
        value when small enough to travel inside the task spec (no object-store round trip:
        -2.4 ms a round on W1), else `ray.put` once and shared by reference."""
        if vector is None:
            return None
        array = vector.numpy()
        return array if array.nbytes <= INLINE_ARG_BYTES else self._ray.put(array)

    def map(self, method, args, num_returns=1):
        """Pool p runs method(pool, *args[p]) as an actor call; returns object refs without
        waiting (a list of refs per pool if num_returns > 1). Refs passed as arguments of a
        later call are resolved by Ray: values over 1 MiB go pool to pool through the object
        store, smaller ones travel inline via the driver."""
        return [actor.run.options(num_returns=num_returns).remote(
                    *pack_call(method.__name__, a, False, self._ray.ObjectRef))
                for actor, a in zip(self._actors, args, strict=True)]

    def get(self, handles):
        try:
            return self._ray.get(list(handles))
        except self._ray.exceptions.RayActorError as err:
            raise PoolDied(self._pool_of(err), str(err).splitlines()[0]) from None

    def _pool_of(self, err) -> int:
        """The pool whose actor the error is about (-1 if none of ours is named)."""
        dead = getattr(err, "actor_id", None)
        for i, actor in enumerate(self._actors):
            if dead is not None and actor._actor_id.hex() == dead:
                return i
        return -1

    def snapshot(self) -> list[bytes]:
        return self.get([a.snapshot.remote() for a in self._actors])

    def restore(self, states: list[bytes]) -> None:
        self.get([a.restore.remote(state) for a, state in zip(self._actors, states,
                                                               strict=True)])

    def restart(self, pool: int) -> None:
        """A new actor for pool `pool` (every pool's, if it is not known which died) built
        from the shard already in the object store; start-up is waited for."""
        spec_ref, extra_refs, shard_refs = self._refs
        for i in range(self.num_pools) if pool < 0 else [pool]:
            with contextlib.suppress(Exception):
                self._ray.kill(self._actors[i])
            self._actors[i] = self._host()
            self._ray.get(self._actors[i].build.remote(self._pool_class, spec_ref,
                                                       shard_refs[i], *extra_refs))

    def pids(self) -> list[int]:
        """The pools' worker processes (tests kill one)."""
        return self.get([a.pid.remote() for a in self._actors])

    def nodes(self) -> list[str]:
        """Each pool's Ray node id, in pool order."""
        return self._ray.get([a.node_id.remote() for a in self._actors])

    def close(self) -> None:
        """Kill the actors, or (reuse) empty them and keep them for the next run."""
        if self._reuse and self._actors and self._key not in _HOSTS:
            try:
                self._ray.get([a.release.remote() for a in self._actors])
                _HOSTS[self._key] = list(self._actors)
            except Exception:  # a host that died is not kept
                for actor in self._actors:
                    self._ray.kill(actor)
        else:
            for actor in self._actors:
                self._ray.kill(actor)
        self._actors = []


class RayChunkMap:
    """Runs the column chunks of a holistic aggregation as parallel Ray tasks.

    The [K, P] stack is put in the object store once (kept for the next kernel call on the
    same tensor, e.g. gram then combine) and split into one contiguous group of chunks per
    worker. Chunk widths are fixed by engine/core/parallel.py, so the results are the serial
    map's bits. Stacks under `min_elements` stay in-process: shipping them costs more.
    The tasks ask for no CPU: pool actors hold the CPUs and sit idle while the driver
    aggregates.
    """

    def __init__(self, workers: int, min_elements: int = 1 << 24) -> None:
        import ray

        self._ray, self.workers, self.min_elements = ray, workers, min_elements
        self._task = ray.remote(num_cpus=0)(_run_chunks)
        self._cached: tuple[torch.Tensor, int, object] | None = None

    def __call__(self, fn, x, spans):
        if x.numel() < self.min_elements or len(spans) == 1:
            return serial_map(fn, x, spans)
        ref = self._put(x)
        groups = [g for g in np.array_split(np.arange(len(spans)), self.workers) if g.size]
        futures = [self._task.remote(fn, ref, [spans[i] for i in g]) for g in groups]
        return [out for part in self._ray.get(futures) for out in part]

    def _put(self, x: torch.Tensor):
        if self._cached is None or self._cached[0] is not x or self._cached[1] != x._version:
            self._cached = (x, x._version, self._ray.put(x.numpy()))
        return self._cached[2]


def _run_chunks(fn, x: np.ndarray, spans) -> list[torch.Tensor]:
    pin_torch_arithmetic()
    return [fn(torch.from_numpy(np.ascontiguousarray(x[:, lo:hi]))) for lo, hi in spans]


# In a Ray worker, glibc hands freed multi-MB tensors back to the kernel and every new one
# page-faults in again (measured: ~665 faults per W1 round in a pool actor, 12 in-process).
# Fixed thresholds keep such buffers in the heap: W1 pool compute 36.9 -> 31.8 ms per round.
POOL_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}

# Pool results up to 1 MiB (partial sums, per-client columns) go straight back to the driver
# instead of through the plasma store, which lives in the raylet: on the 2-core machine the
# raylet otherwise burns ~9 ms of CPU per W1 round, taken from the pools.
EMBEDDED_RAY_CONFIG = {"max_direct_call_object_size": 1 << 20}
# Per-round vectors up to this size go by value in the pools' calls: under Ray's default
# 100 KB limit for arguments inlined in the task spec, so it holds on any cluster.
INLINE_ARG_BYTES = 64 << 10


def connect_ray(address: str | None) -> int:
    """Join `address`, or start a private embedded Ray (see `start_private_ray`).
    Returns the cluster's CPU count. Reuses a Ray already initialised in this process."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        common = dict(include_dashboard=False, logging_level=logging.WARNING,
                      configure_logging=True)
        with _own_sigterm():
            _init(ray, address, common)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


@contextlib.contextmanager
def _own_sigterm():
    """ray.init replaces the driver's SIGTERM handler with sys.exit(15), which no run can
    record as an outcome; put the process's own handler back (run.py's raises Terminated)."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before is not None:
            signal.signal(signal.SIGTERM, before)


def _init(ray, address: str | None, common: dict) -> None:
    if not address:
        start_private_ray(**common)
        return
    _check_reachable(address)
    _token_auth()  # as `ray start` runs by default: the driver sends ~/.ray/auth_token
    try:
        ray.init(address=address, **common)
    except ConnectionError as err:
        mode = os.environ["RAY_AUTH_MODE"]
        used = ("sent the token of RAY_AUTH_TOKEN or ~/.ray/auth_token (RAY_AUTH_MODE=token)"
                if mode == "token" else f"used RAY_AUTH_MODE={mode}")
        raise ConfigError(
            f"--address {address}: cannot join a Ray cluster ({str(err).splitlines()[0]}); "
            f"this driver {used}, and a cluster started by `ray start` expects "
            "RAY_AUTH_MODE=token and its own token") from None


def _token_auth() -> None:
    """Token authentication on (`RAY_AUTH_MODE=token`), unless the user chose a mode: Ray's
    default for `ray start`, set explicitly so Ray reads it (and prints no warning about it)."""
    if "RAY_AUTH_MODE" not in os.environ:
        from ray._raylet import Config

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # as Ray does when it turns its default on: re-read the mode


def start_private_ray(**options) -> None:
    """A new Ray cluster for this process alone, every port bound to 127.0.0.1.

    - `address="local"` always starts a new cluster, never attaching to one that `ray start`
      runs on the machine (plain `ray.init()` would, and then refuse our `_system_config`).
    - Ray resolves a 127.0.0.1 node address to the machine's external one when clusters are
      enabled, and its servers then listen on every interface; with the cluster switch off
      (the env var reaches the raylet and workers, the constant this process's Ray) it keeps
      loopback, and GCS, raylet, object manager and every worker bind there only.
    - Token authentication stays on, set explicitly (`RAY_AUTH_MODE=token`, unless the user
      chose otherwise), so Ray's start-up warning about its default does not print: other
      users of the machine can reach loopback ports, so the token still matters.
    """
    import ray
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    _token_auth()
    ray.init(address="local", _node_ip_address="127.0.0.1",
             _system_config=EMBEDDED_RAY_CONFIG, **options)


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes of Ray retries, when host:port does not answer."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms are Ray's to resolve
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as err:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({err})") from None


def make_pools(task: FederatedTask, spec: PoolSpec, options: RuntimeOptions,
               pool_class: type[ClientPool] = ClientPool, extra: tuple = ()) -> Pools:
    """The backend's pools, each a `pool_class(spec, shard, *extra)`."""
    if options.backend == "inline":
        return InlinePools(task, spec, _pool_count(options.pools or 1, task), pool_class, extra)
    cpus = connect_ray(options.address)
    cpus = min(cpus, options.cpus or cpus)
    return RayPools(task, spec, _pool_count(options.pools or cpus, task), cpus, pool_class,
                    extra, options.reuse_actors)


def _pool_count(requested: int, task: FederatedTask) -> int:
    return max(1, min(requested, task.num_clients))
