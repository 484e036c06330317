"""Arrow logs: fixed schemas, rows built column-wise, written as Parquet part files.

Layout: <root>/<table>/run_id=<id>/part-<seq>.parquet, so `pyarrow.dataset` (hive partitioning)
reads a whole experiment or sweep at once. A part file is written under a dot-name (ignored by
dataset readers) and renamed into place, so a crash or SIGKILL never leaves a half-written file
where a reader looks: what was flushed stays readable. The logger knows nothing of Ray.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.core.errors import ConfigError

RUN_ID = pa.schema([("run_id", pa.string())])

# A value that is not there (not evaluated, not applicable) is null in the files: None in a
# row record's (object) column. NaN and inf are values: a diverged loss stays NaN, so the
# logs tell "not evaluated" apart from "evaluated to NaN".
MISSING = None


def missing() -> np.ndarray:
    """A one-row column holding no value (null)."""
    return np.array([MISSING], dtype=object)

RUNS = pa.schema([
    ("experiment", pa.string()), ("config_yaml", pa.string()), ("config_digest", pa.string()),
    ("seed", pa.int64()), ("mode", pa.string()), ("backend", pa.string()),
    ("executor", pa.string()), ("num_pools", pa.int32()), ("num_clients", pa.int64()),
    ("rounds_planned", pa.int32()), ("num_params", pa.int64()),
    ("started_at", pa.timestamp("ms", tz="UTC")), ("versions", pa.string()),
    # decentralized runs: round 0's graph and the spectral gap of its mixing matrix
    ("topology", pa.string()), ("num_edges", pa.int64()), ("degree_min", pa.int32()),
    ("degree_mean", pa.float64()), ("degree_max", pa.int32()), ("spectral_gap", pa.float64()),
    # the client data store the run read (scenarios/store.py) and the seconds this run spent
    # building it (null: read from the cache; both null without one, e.g. environments)
    ("data_store", pa.string()), ("data_build_s", pa.float64()),
])
ROUNDS = pa.schema([
    ("round", pa.int32()), ("num_selected", pa.int32()), ("num_updates", pa.int32()),
    ("num_byzantine", pa.int32()), ("train_loss", pa.float64()), ("test_loss", pa.float64()),
    ("test_accuracy", pa.float64()),
    ("mean_update_norm", pa.float64()), ("round_wall_s", pa.float64()),
    ("train_wall_s", pa.float64()), ("aggregate_wall_s", pa.float64()),
    ("eval_wall_s", pa.float64()), ("wall_time_s", pa.float64()),
    ("client_updates_per_s", pa.float64()),
    # decentralized runs (null in federated ones): over honest peers
    ("consensus_distance", pa.float64()), ("peer_accuracy_mean", pa.float64()),
    ("peer_accuracy_min", pa.float64()), ("peer_accuracy_max", pa.float64()),
    ("gossip_messages", pa.int64()), ("virtual_time", pa.float64()),
    ("bytes_communicated", pa.int64()), ("dp_epsilon", pa.float64()),
    # tasks learnt by acting (test_loss and test_accuracy null): the mean test return
    ("test_return", pa.float64()),
    # sync FL with a modelled aggregation platform (server.platform): last kept arrival ->
    # global model ready, and the aggregator instance-seconds held in the round
    ("aggregation_latency_s", pa.float64()), ("aggregator_s", pa.float64()),
])
CLIENTS = pa.schema([
    ("round", pa.int32()), ("client_id", pa.int64()), ("pool", pa.int32()),
    ("status", pa.string()), ("num_samples", pa.int32()), ("local_steps", pa.int32()),
    ("train_loss", pa.float32()), ("update_norm", pa.float32()), ("weight", pa.float32()),
    ("pool_train_s", pa.float32()), ("byzantine", pa.bool_()), ("task_s", pa.float64()),
    ("staleness", pa.int32()), ("bytes_up", pa.int64()),
])
PEERS = pa.schema([
    ("round", pa.int32()), ("peer_id", pa.int64()), ("pool", pa.int32()),
    ("train_loss", pa.float32()), ("test_loss", pa.float32()), ("test_accuracy", pa.float32()),
    ("distance_to_mean", pa.float64()), ("byzantine", pa.bool_()), ("bytes_sent", pa.int64()),
    ("test_return", pa.float64()),
])
OUTCOMES = pa.schema([
    ("status", pa.string()), ("error", pa.string()), ("rounds_done", pa.int32()),
    ("wall_s", pa.float64()), ("finished_at", pa.timestamp("ms", tz="UTC")),
])
STATUSES = ("completed", "failed", "interrupted", "diverged")
EVENTS = pa.schema([
    ("round", pa.int32()), ("time", pa.float64()), ("kind", pa.string()),
    ("client_id", pa.int64()), ("value", pa.float64()),
])


class RunRows(NamedTuple):
    experiment: np.ndarray
    config_yaml: np.ndarray
    config_digest: np.ndarray
    seed: np.ndarray
    mode: np.ndarray
    backend: np.ndarray
    executor: np.ndarray
    num_pools: np.ndarray
    num_clients: np.ndarray
    rounds_planned: np.ndarray
    num_params: np.ndarray
    started_at: np.ndarray
    versions: np.ndarray
    topology: np.ndarray = missing()
    num_edges: np.ndarray = missing()
    degree_min: np.ndarray = missing()
    degree_mean: np.ndarray = missing()
    degree_max: np.ndarray = missing()
    spectral_gap: np.ndarray = missing()
    data_store: np.ndarray = missing()
    data_build_s: np.ndarray = missing()


class RoundRows(NamedTuple):
    round: np.ndarray
    num_selected: np.ndarray
    num_updates: np.ndarray
    num_byzantine: np.ndarray  # updates replaced or poisoned by attackers
    train_loss: np.ndarray
    test_loss: np.ndarray  # MISSING (null) where not evaluated; NaN only if it was NaN
    test_accuracy: np.ndarray
    mean_update_norm: np.ndarray
    round_wall_s: np.ndarray
    train_wall_s: np.ndarray  # decentralized: training and gossip steps (async: the events)
    aggregate_wall_s: np.ndarray  # decentralized: the consensus sums (and final merge)
    eval_wall_s: np.ndarray
    wall_time_s: np.ndarray
    client_updates_per_s: np.ndarray
    consensus_distance: np.ndarray = missing()  # mean ||z_i - z_bar||^2
    peer_accuracy_mean: np.ndarray = missing()  # over the evaluated sample of peers
    peer_accuracy_min: np.ndarray = missing()
    peer_accuracy_max: np.ndarray = missing()
    gossip_messages: np.ndarray = np.array([0])  # models sent between peers this round
    virtual_time: np.ndarray = missing()  # at the end of the round (async gossip)
    bytes_communicated: np.ndarray = np.array([0])  # model bytes sent this round (up + down)
    dp_epsilon: np.ndarray = missing()  # central DP: epsilon spent so far (at delta)
    test_return: np.ndarray = missing()  # a task learnt by acting: mean return, held-out envs
    aggregation_latency_s: np.ndarray = missing()  # server.platform: last arrival -> model
    aggregator_s: np.ndarray = missing()  # server.platform: aggregator instance-seconds


class ClientRows(NamedTuple):
    round: np.ndarray
    client_id: np.ndarray
    pool: np.ndarray
    status: np.ndarray
    num_samples: np.ndarray
    local_steps: np.ndarray
    train_loss: np.ndarray
    update_norm: np.ndarray
    weight: np.ndarray
    pool_train_s: np.ndarray
    byzantine: np.ndarray  # the client is an attacker (its update_norm is what it sent)
    task_s: np.ndarray  # virtual seconds from dispatch to arrival (NaN: it did not train)
    staleness: np.ndarray  # model versions between dispatch and aggregation (0 when sync)
    bytes_up: np.ndarray  # what the client uploaded (compressed size; 0 if it sent nothing)


class PeerRows(NamedTuple):
    """One row per evaluated peer per evaluation round (a seeded sample of honest peers)."""

    round: np.ndarray
    peer_id: np.ndarray
    pool: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray
    distance_to_mean: np.ndarray  # ||z_i - z_bar||^2
    byzantine: np.ndarray
    bytes_sent: np.ndarray = np.array([0])  # the peer's gossip messages this round (wire bytes)
    test_return: np.ndarray = missing()  # a task learnt by acting: the peer's mean test return


class EventRows(NamedTuple):
    """One row per fault (scenarios/failures.py): crash, recover, leave, join, lost_downlink,
    dropped_before, dropped_after, lost_uplink, straggler, over_selected, ..."""

    round: np.ndarray
    time: np.ndarray  # virtual time (the start of the round or slot)
    kind: np.ndarray
    client_id: np.ndarray  # a client's or a peer's id
    value: np.ndarray  # e.g. a crash's downtime in slots, a straggler's task time


class OutcomeRows(NamedTuple):
    """One row when a run ends: how (one of STATUSES), and the error that ended it."""

    status: np.ndarray
    error: np.ndarray  # "ExceptionType: message", null when completed
    rounds_done: np.ndarray
    wall_s: np.ndarray
    finished_at: np.ndarray


# Flush order: a round's row is written after its clients' rows, so a round present in
# `rounds` always has its client rows on disk, even if the process dies mid-flush.
TABLES: dict[type, tuple[str, pa.Schema]] = {
    RunRows: ("runs", RUNS), ClientRows: ("clients", CLIENTS), PeerRows: ("peers", PEERS),
    EventRows: ("events", EVENTS), RoundRows: ("rounds", ROUNDS),
    OutcomeRows: ("outcomes", OUTCOMES),
}


def _broadcast(rows: NamedTuple) -> NamedTuple:
    """A record whose one-value columns (defaults such as NaN or 0) repeat to its row count."""
    columns = [np.atleast_1d(np.asarray(c)) for c in rows]
    n = max(c.size for c in columns)
    return type(rows)(*(np.repeat(c, n) if c.size == 1 and n > 1 else c for c in columns))


def _joined(records: list[NamedTuple]) -> NamedTuple:
    """Many row records of one table -> one record of concatenated columns."""
    return type(records[0])(*(np.concatenate([np.atleast_1d(np.asarray(c)) for c in columns])
                              for columns in zip(*records, strict=True)))


def to_batch(rows: NamedTuple) -> pa.RecordBatch:
    """Column-wise conversion: MISSING (None) becomes null, NaN stays NaN."""
    _, schema = TABLES[type(rows)]
    arrays = []
    for field, column in zip(schema, rows, strict=True):
        column = np.asarray(column)
        numeric = pa.types.is_floating(field.type) or pa.types.is_integer(field.type)
        if column.dtype == object and numeric:
            absent = np.array([v is MISSING for v in column], dtype=bool)
            values = np.where(absent, 0, column).astype(field.type.to_pandas_dtype())
            arrays.append(pa.array(values, type=field.type, mask=absent))
        else:
            arrays.append(pa.array(column, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class RunLogger:
    """Buffers row records per table; `flush` converts them to Arrow once and writes one atomic
    part file per table with new rows. `constants` (a sweep's parameters of this run) become
    columns of every table that does not already have a column of that name."""

    def __init__(self, root: Path, run_id: str, flush_every_s: float = 2.0,
                 constants: dict[str, pa.Scalar] | None = None) -> None:
        self.root, self.run_id, self.flush_every_s = Path(root), run_id, flush_every_s
        self.constants = dict(constants or {})
        self._counts: dict[type, int] = {}
        self._pending: dict[type, list[NamedTuple]] = {}
        self._seq = 0
        self._last_flush = time.monotonic()

    def append(self, rows: NamedTuple) -> None:
        rows = _broadcast(rows)
        self._pending.setdefault(type(rows), []).append(rows)
        self._counts[type(rows)] = self.count(type(rows)) + len(rows[0])
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def count(self, kind: type) -> int:
        """Rows of one table appended so far (flushed or not)."""
        return self._counts.get(kind, 0)

    def position(self) -> dict:
        """Where the logs stand, every row flushed: what a checkpoint records so that a resumed
        run writes on from exactly there."""
        self.flush()
        return {"seq": self._seq, "counts": {kind.__name__: n for kind, n in
                                             self._counts.items()}}

    def rewind(self, position: dict) -> None:
        """Back to `position`: this run's part files written after it are deleted (a killed
        run's rows past its checkpoint, which the resumed run writes again) and unflushed
        rows dropped."""
        self._pending.clear()
        for name, _ in TABLES.values():
            folder = self.root / name / f"run_id={self.run_id}"
            for part in folder.glob("*part-*.parquet*"):
                if int(part.name.lstrip(".").split("-")[1].split(".")[0]) >= position["seq"]:
                    part.unlink()
        by_name = {kind.__name__: kind for kind in TABLES}
        self._counts = {by_name[name]: n for name, n in position["counts"].items()}
        self._seq = position["seq"]

    def flush(self) -> None:
        """Write every table's pending rows (TABLES order: rounds, then outcomes, last). A
        table that cannot be written (a full disk) does not stop the others: the outcome row
        still gets its chance; the first error is raised after."""
        failed: OSError | None = None
        for kind, (name, _) in TABLES.items():
            if self._pending.get(kind):
                try:
                    self._write(name, pa.Table.from_batches(
                        [to_batch(_joined(self._pending[kind]))]))
                except OSError as err:
                    failed = failed or err
        self._pending.clear()
        self._last_flush = time.monotonic()
        if failed is not None:
            raise failed

    def _write(self, name: str, table: pa.Table) -> None:
        for column, value in self.constants.items():
            if column not in table.column_names:
                values = pa.array([value.as_py()] * table.num_rows, type=value.type)
                table = table.append_column(pa.field(column, value.type), values)
        folder = self.root / name / f"run_id={self.run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"part-{self._seq:06d}.parquet"
        tmp = folder / f".{final.name}.tmp"
        self._seq += 1
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, final)
        except OSError:
            tmp.unlink(missing_ok=True)  # no partial file is left for readers to trip on
            raise


def check_log_dir(root: Path, experiment: str | None = None) -> Path:
    """`root` (and the experiment's folder in it) as places this process can write, checked
    without creating anything, so that a run refused later leaves nothing behind: each is an
    existing writable directory, or can be created in its nearest existing ancestor. One
    ConfigError line otherwise. Returns root (the logger creates the folders)."""
    root = Path(root)
    for path, label in [(root, f"--log-dir {root}"),
                        *([(root / experiment, f"the experiment folder {root / experiment}")]
                          if experiment else [])]:
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"{label}: exists and is not a directory")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"{label}: not writable")
            continue
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"{label}: cannot create it ({parent} is not a directory)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{label}: cannot create it ({parent} is not writable)")
        break  # what is below a folder still to create can be created too
    return root


def event_rows(round_idx: int, time_s: float, events) -> EventRows:
    """A round's (or slot's) scenarios.failures.Events as rows."""
    n = events.client_id.size
    return EventRows(round=np.full(n, round_idx), time=np.full(n, time_s),
                     kind=events.kind.astype(str), client_id=events.client_id,
                     value=events.value)


def error_line(err: BaseException) -> str:
    """An exception as the one line an outcomes row keeps."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def outcome_row(status: str, error: str | None, rounds_done: int, wall_s: float) -> OutcomeRows:
    now = np.datetime64(datetime.now(UTC).replace(tzinfo=None), "ms")
    return OutcomeRows(status=[status], error=np.array([error], dtype=object),
                       rounds_done=[rounds_done], wall_s=[wall_s], finished_at=np.array([now]))


SCHEMAS: dict[str, pa.Schema] = dict(TABLES.values())


def read_table(root: Path, name: str, constants: bool = False) -> pa.Table:
    """One table of every run under `root`, with its run_id column (empty if none yet). With
    `constants`, also the runs' constant columns (swept parameters; null where a run has none)."""
    full = SCHEMAS[name].append(RUN_ID.field(0))
    folder = Path(root) / name
    if not folder.is_dir():
        return full.empty_table()
    partitioning = ds.partitioning(RUN_ID, flavor="hive")
    if constants:
        found = ds.dataset(folder, format="parquet", partitioning=partitioning)
        try:
            full = pa.unify_schemas([full, *(f.physical_schema for f in found.get_fragments())])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ConfigError(f"{folder}: runs disagree on a column's type: {err}") from None
    return ds.dataset(folder, format="parquet", partitioning=partitioning, schema=full).to_table()
