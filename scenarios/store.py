"""The client data store: every client's training rows in an Arrow IPC file, sorted by client,
written once per (dataset, parameters, partition, seed) to a content-addressed cache folder
and memory-mapped by the pools, each reading only the rows of the clients it trains.

A store folder (`<cache>/<key>/`, the cache being $CONCORD_DATA_CACHE or
~/.cache/concord/data):

    train.arrow   x (fixed_size_list<float32>[F]) and y (int64): the training rows, sorted by
                  client (client i's rows are offsets[i]:offsets[i+1]), in record batches of
                  whole clients, about BATCH_BYTES each
    test.arrow    the held-out test rows (x, y), at most task.max_test_samples
    val.arrow     the server's validation rows (task.validation_fraction), if any
    clients.arrow num_samples (int64), one row per client
    meta.json     num_classes, input_shape, and what the key was computed from

The key hashes the dataset's and the partition's functions and parameters (and the source of
their modules, so an edited generator is not served stale data), the population size, the run
seed, the test and validation fractions, and for a parameter that names a file or folder its
files' sizes and modification times. A store is built in a private temporary folder and
renamed into place, so concurrent runs (a sweep) and crashes never leave a half-written one.

The build holds no client's data whole: the dataset's samples stream to a scratch file block
by block (`Stream`, as the synthetic generator yields them), the splits and the partition are
drawn from the labels and owners (O(n) integers), and the training rows are copied in client
order, a batch at a time. Draws happen in exactly the order they did when the data lived in
the driver, so a store holds the same bits.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import mmap
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from scenarios.datasets import Samples, Stream, holdout_mask
from scenarios.partition import partition

STORE_FORMAT = 1  # bump when the layout changes
BATCH_BYTES = 64 << 20  # target size of a record batch of train.arrow
CACHE_ENV = "CONCORD_DATA_CACHE"
ANNOUNCE_AFTER_S = 2.0  # a build that takes longer says so on the log (run.py: stderr)
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where stores live: $CONCORD_DATA_CACHE, else ~/.cache/concord/data."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "concord" / "data"


@dataclass(frozen=True)
class ClientStore:
    """A built store: its folder and the O(N) metadata the driver keeps (picklable: pools get
    it and open their own memory map)."""

    path: Path
    offsets: np.ndarray  # int64 [N + 1]: client i's training rows are offsets[i]:offsets[i+1]
    num_classes: int
    input_shape: tuple[int, ...]
    built_s: float | None = None  # seconds this process spent building it; None: from cache

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    def open(self) -> RowReader:
        return RowReader(self.path / "train.arrow", self.num_features)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The held-out split `name` ("test", "val") as in-memory arrays, or None."""
        file = self.path / f"{name}.arrow"
        if not file.exists():
            return None
        with pa.memory_map(str(file)) as source:
            table = pa.ipc.open_file(source).read_all()
        x = _flat(table.column("x").combine_chunks(), self.num_features).copy()
        return x, table.column("y").to_numpy().astype(np.int64)


class RowReader:
    """train.arrow memory-mapped: clients' rows copied out on demand. Only the pages holding
    them are touched, and they are unmapped again after each read (the kernel maps file pages
    in large folios, up to 2 MB a fault, so a process's resident memory would otherwise grow
    towards the whole store as rounds visit its clients; the pages stay in the page cache)."""

    def __init__(self, file: Path, num_features: int) -> None:
        if not file.is_file():  # a pool on another machine than the one that built it
            raise ConfigError(f"the client data store {file.parent} is not on this machine "
                              f"({socket.gethostname()}); on a cluster, set {CACHE_ENV} to a "
                              "folder every node shares")
        with open(file, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        reader = pa.ipc.open_file(pa.py_buffer(self._map))  # zero-copy over the map
        base = np.frombuffer(self._map, dtype=np.uint8).__array_interface__["data"][0]
        self._x, self._y, self._spans, starts = [], [], [], [0]
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            self._x.append(_flat(batch.column(0), num_features))
            self._y.append(batch.column(1).to_numpy(zero_copy_only=True))
            self._spans.append(_span([self._x[-1], self._y[-1]], base))
            starts.append(starts[-1] + batch.num_rows)
        self._starts = np.asarray(starts, dtype=np.int64)

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    def read(self, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x [sum(counts), F] float32, y int64): the rows starts[i]:starts[i]+counts[i] of
        each i in turn, copied (writable)."""
        rows = ranges(starts, counts)
        x = np.empty((rows.size, self._x[0].shape[1] if self._x else 0), dtype=np.float32)
        y = np.empty(rows.size, dtype=np.int64)
        batch = np.searchsorted(self._starts, rows, side="right") - 1
        for b in np.unique(batch):
            at = batch == b
            local = rows[at] - self._starts[b]
            x[at] = self._x[b][local]
            y[at] = self._y[b][local]
            self._map.madvise(mmap.MADV_DONTNEED, *self._spans[b])
        return x, y


def _span(views: list[np.ndarray], base: int) -> tuple[int, int]:
    """(start, length) of the map's pages under `views` (start page-aligned)."""
    lo = min(v.__array_interface__["data"][0] for v in views) - base
    hi = max(v.__array_interface__["data"][0] + v.nbytes for v in views) - base
    lo -= lo % mmap.PAGESIZE
    return lo, hi - lo


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64: starts[0]..starts[0]+counts[0]-1, then starts[1].., ... (vectorised)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    begin = np.cumsum(counts) - counts
    return np.repeat(np.asarray(starts, dtype=np.int64) - begin, counts) + np.arange(total)


def _flat(column: pa.Array, num_features: int) -> np.ndarray:
    """A fixed_size_list<float32> column as a [rows, F] array (zero-copy when it can)."""
    values = column.values if column.offset == 0 else column.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(-1, num_features)


# --- the key ---------------------------------------------------------------------------------


def describe(fn: Callable) -> dict:
    """A dataset's or partition's function, as the key sees it: its name, bound parameters
    (files and folders by size and modification time too), and its module's source hash."""
    params = dict(fn.keywords) if isinstance(fn, functools.partial) else {}
    func = fn.func if isinstance(fn, functools.partial) else fn
    module = sys.modules.get(func.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    return {"function": f"{func.__module__}:{func.__qualname__}",
            "params": {k: _value(v) for k, v in sorted(params.items())},
            "source": hashlib.sha256(source.encode()).hexdigest()}


def _value(value):
    if isinstance(value, str) and value and Path(value).exists():
        files = [Path(value)] if Path(value).is_file() else sorted(
            p for p in Path(value).rglob("*") if p.is_file())
        return {"path": str(Path(value).resolve()),
                "files": [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def store_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=repr)
                          .encode()).hexdigest()[:32]


# --- opening and building --------------------------------------------------------------------


def open_store(path: Path, built_s: float | None = None) -> ClientStore:
    meta = json.loads((path / "meta.json").read_text())
    with pa.memory_map(str(path / "clients.arrow")) as source:
        sizes = pa.ipc.open_file(source).read_all().column("num_samples").to_numpy()
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return ClientStore(path, offsets, int(meta["num_classes"]), tuple(meta["input_shape"]),
                       built_s)


def lookup(description: dict, cache: Path | None = None) -> ClientStore | None:
    """The cached store for `description`, if one was built."""
    final = (cache or cache_root()) / store_key({"format": STORE_FORMAT, **description})
    return open_store(final) if (final / "meta.json").exists() else None


def cached(description: dict, build: Callable[[Path], None],
           cache: Path | None = None) -> ClientStore:
    """The store for `description`, built by `build(folder)` if the cache lacks it."""
    cache = cache or cache_root()
    final = cache / store_key({"format": STORE_FORMAT, **description})
    if (final / "meta.json").exists():
        return open_store(final)
    cache.mkdir(parents=True, exist_ok=True)
    scratch = cache / f".building-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    scratch.mkdir()
    start = time.perf_counter()
    # said only if it takes a while (a quick build, or a bad config, stays silent)
    slow = threading.Timer(ANNOUNCE_AFTER_S, log.info, (
        "data: building the client data store in %s (once: runs of the same data read it "
        "from the cache) ...", final))
    slow.daemon = True
    slow.start()
    try:
        build(scratch)
        meta = json.loads((scratch / "meta.json").read_text())
        (scratch / "meta.json").write_text(json.dumps({**meta, "key": description},
                                                      default=repr, indent=1))
        try:
            os.rename(scratch, final)
        except OSError:  # another run built it meanwhile: keep theirs
            if not (final / "meta.json").exists():
                raise
    finally:
        slow.cancel()
        shutil.rmtree(scratch, ignore_errors=True)
    built = time.perf_counter() - start
    if built > ANNOUNCE_AFTER_S:
        size = sum(p.stat().st_size for p in final.iterdir())
        log.info("data: built in %.1f s (%s)", built,
                 f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB")
    return open_store(final, built)


def write_store(folder: Path, drawn: Samples | Stream, num_clients: int,
                partitioner: Callable, seeds: SeedTree, rng: np.random.Generator,
                test_fraction: float, max_test_samples: int,
                validation_fraction: float = 0.0) -> None:
    """Draw the dataset's samples into `folder`: hold out the test set (drawn from `rng`, the
    dataset's own stream, after its samples), then the server's validation share (stream
    "validation"), partition the rest (stream "partition") and write the training rows in
    client order."""
    if isinstance(drawn, Samples):
        drawn = Stream(iter([(drawn.x, drawn.y)]), drawn.owner, drawn.num_classes,
                       drawn.input_shape)
    num_features = int(np.prod(drawn.input_shape))
    scratch = folder / "samples.f32"
    y = _spill(drawn.blocks, scratch, num_features)
    owner = drawn.owner
    held = holdout_mask(y.size, test_fraction, owner, rng)
    test_idx = np.flatnonzero(held)
    if test_idx.size == 0:
        raise ConfigError(f"task.test_fraction: {test_fraction} holds out no test sample; "
                          "raise it (or the samples per client)")
    if test_idx.size > max_test_samples:
        test_idx = np.sort(rng.choice(test_idx, max_test_samples, replace=False))
    train_idx = np.flatnonzero(~held)
    del held
    owner_train = None if owner is None else owner[train_idx]
    val_idx = None
    if validation_fraction > 0:
        val = holdout_mask(train_idx.size, validation_fraction, owner_train,
                           seeds.rng("validation"))
        if not val.any():
            raise ConfigError(f"task.validation_fraction: {validation_fraction} holds out no "
                              "sample; raise it")
        val_idx, train_idx = train_idx[val], train_idx[~val]
        owner_train = None if owner_train is None else owner_train[~val]
    clients = partition(y[train_idx], num_clients, partitioner, seeds.rng("partition"),
                        owner_train)
    del owner_train
    order = np.argsort(clients, kind="stable")
    sizes = np.bincount(clients, minlength=num_clients).astype(np.int64)
    del clients
    rows = train_idx[order]
    del order, train_idx
    x = np.memmap(scratch, dtype=np.float32, mode="r", shape=(y.size, num_features))
    schema = pa.schema([("x", pa.list_(pa.float32(), num_features)), ("y", pa.int64())])
    _write(folder / "train.arrow", schema, x, y, rows, _client_batches(sizes, num_features))
    _write(folder / "test.arrow", schema, x, y, test_idx, [test_idx.size])
    if val_idx is not None:
        _write(folder / "val.arrow", schema, x, y, val_idx, [val_idx.size])
    del x
    scratch.unlink()
    _write_meta(folder, sizes, drawn.num_classes, drawn.input_shape, test_idx.size)


def write_rows(folder: Path, x: np.ndarray, y: np.ndarray, sizes: np.ndarray,
               num_classes: int, input_shape: tuple[int, ...]) -> ClientStore:
    """A store of given training rows, already in client order (client i holds sizes[i]
    rows), without held-out splits: for tests that need particular data."""
    folder.mkdir(parents=True, exist_ok=True)
    num_features = int(np.prod(input_shape))
    scratch = folder / "samples.f32"
    np.ascontiguousarray(x, dtype=np.float32).tofile(scratch)
    x = np.memmap(scratch, dtype=np.float32, mode="r", shape=(len(y), num_features))
    schema = pa.schema([("x", pa.list_(pa.float32(), num_features)), ("y", pa.int64())])
    _write(folder / "train.arrow", schema, x, np.asarray(y, dtype=np.int64),
           np.arange(len(y)), _client_batches(np.asarray(sizes), num_features))
    del x
    scratch.unlink()
    _write_meta(folder, np.asarray(sizes, dtype=np.int64), num_classes, input_shape, 0)
    return open_store(folder)


def _write_meta(folder: Path, sizes: np.ndarray, num_classes: int,
                input_shape: tuple[int, ...], test_rows: int) -> None:
    with pa.OSFile(str(folder / "clients.arrow"), "wb") as sink, pa.ipc.new_file(
            sink, pa.schema([("num_samples", pa.int64())])) as writer:
        writer.write_table(pa.table({"num_samples": sizes}))
    (folder / "meta.json").write_text(json.dumps({
        "num_classes": int(num_classes), "input_shape": list(input_shape),
        "num_clients": int(sizes.size), "train_rows": int(sizes.sum()),
        "test_rows": int(test_rows)}))


def _spill(blocks: Iterable[tuple[np.ndarray, np.ndarray]], file: Path,
           num_features: int) -> np.ndarray:
    """Write the blocks' x to `file` (raw float32, sample order); return their y."""
    ys = []
    with open(file, "wb") as out:
        for x, y in blocks:
            np.ascontiguousarray(x, dtype=np.float32).reshape(len(y), num_features).tofile(out)
            ys.append(np.asarray(y, dtype=np.int64))
    return np.concatenate(ys) if ys else np.zeros(0, np.int64)


def _client_batches(sizes: np.ndarray, num_features: int) -> list[int]:
    """Rows per record batch: whole clients, about BATCH_BYTES each (a bigger client alone)."""
    target = max(1, BATCH_BYTES // (4 * max(num_features, 1)))
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if ends.size else 0
    batches, done = [], 0
    while done < total:
        within = int(np.searchsorted(ends, done + target, side="right"))  # ends[:within] fit
        stop = int(ends[within - 1]) if within and ends[within - 1] > done else int(
            ends[np.searchsorted(ends, done, side="right")])
        batches.append(stop - done)
        done = stop
    return batches


def _write(file: Path, schema: pa.Schema, x: np.memmap, y: np.ndarray, rows: np.ndarray,
           batch_rows: list[int]) -> None:
    """Rows `rows` of (x, y), in that order, as record batches of `batch_rows` rows."""
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        lo = 0
        for n in batch_rows or [0]:
            take = rows[lo: lo + n]
            values = pa.array(_gather(x, take).reshape(-1))
            writer.write_batch(pa.record_batch(
                [pa.FixedSizeListArray.from_arrays(values, schema.field("x").type.list_size),
                 pa.array(y[take])], schema=schema))
            lo += n


def _gather(x: np.memmap, take: np.ndarray, chunk: int = 256) -> np.ndarray:
    """x[take] from the scratch file's map, `chunk` rows at a time, each time unmapping the
    pages it touched: the kernel maps file pages in folios of up to 2 MB, so a few thousand
    scattered rows (the test set) would otherwise map the whole file into this process."""
    out = np.empty((take.size, x.shape[1]), dtype=np.float32)
    row = x.shape[1] * x.itemsize
    for lo in range(0, take.size, chunk):
        part = take[lo: lo + chunk]
        out[lo: lo + part.size] = x[part]
        first = int(part.min()) * row
        first -= first % mmap.PAGESIZE
        x._mmap.madvise(mmap.MADV_DONTNEED, first, (int(part.max()) + 1) * row - first)
    return out
