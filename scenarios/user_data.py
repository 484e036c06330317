"""Users' own federated data (DATASETS `parquet` and `leaf`): samples with the client that owns
each, read from files. The natural partition (`partition.kind: natural`) keeps each file
client's samples its own; any other partition pools them.

    task: {dataset: parquet, parquet: {path: data/clients.parquet}}   # client_id, label, features
    task: {dataset: leaf, leaf: {path: data/femnist/train}}           # LEAF's JSON files

Every problem with a file is one ConfigError line naming the key, the file and what is wrong.
The files are read whole once, when the client data store is built (scenarios/store.py); runs
of the same files read the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.parquet as pq
from pydantic import Field

from engine.core.errors import ConfigError
from scenarios.devices import first_line

Shape = Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1, max_length=4)]
PARQUET_KEY, LEAF_KEY = "task.parquet.path", "task.leaf.path"
_ARROW = (".arrow", ".feather", ".ipc")


def parquet(num_clients: int, rng: np.random.Generator, path: str, client: str = "client_id",
            label: str = "label", features: list[str] | None = None,
            shape: Shape | None = None):
    """A Parquet file (.parquet, .pq), a folder of Parquet files, or an Arrow IPC/Feather file
    (.arrow, .feather, .ipc; memory-mapped) with one row per sample: a `client` column (any
    ids: the clients are its distinct values, in sorted order), an integer `label` column
    (classes 0..C-1; strings are coded in sorted order) and the features: the `features`
    columns (numeric), or by default every other column; a single list column (fixed-size or
    equal-length lists, or a fixed-shape tensor) holds a whole sample. `shape`: the sample's
    shape as the model sees it (e.g. [1, 28, 28] for a CNN); default flat."""
    table = _read_table(Path(path))
    return _samples(table, f"{PARQUET_KEY}: {path}", client, label, features, shape)


def leaf(num_clients: int, rng: np.random.Generator, path: str,
         shape: Shape | None = None):
    """LEAF's JSON layout (Caldas et al., 2018, as FEMNIST, Shakespeare and Sent140 ship it): a
    .json file, or a folder of them (read in name order), each {"users": [...],
    "num_samples": [...], "user_data": {user: {"x": [[features], ...], "y": [labels]}}}. A
    user in several files keeps all its samples; users are clients in order of first
    appearance. Features must be numbers (text data such as Sent140's needs a tokenizer
    first); labels non-negative integers."""
    where = f"{LEAF_KEY}: {path}"
    files = _leaf_files(Path(path), where)
    users: dict[str, int] = {}
    xs, ys, owners = [], [], []
    for file in files:
        blob = _leaf_json(file, where)
        for user, count in zip(blob["users"], blob["num_samples"], strict=True):
            data = blob["user_data"].get(user)
            if not isinstance(data, dict) or "x" not in data or "y" not in data:
                raise ConfigError(f"{where}: {file.name}: user {user!r} has no x and y in "
                                  "user_data")
            if len(data["x"]) != len(data["y"]) or len(data["y"]) != count:
                raise ConfigError(f"{where}: {file.name}: user {user!r} has {len(data['x'])} x, "
                                  f"{len(data['y'])} y and num_samples {count}")
            owner = users.setdefault(str(user), len(users))
            xs.extend(data["x"])
            ys.extend(data["y"])
            owners.extend([owner] * count)
    if not ys:
        raise ConfigError(f"{where}: no samples")
    try:
        x = np.asarray(xs, dtype=np.float64)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: x must be equal-length lists of numbers (text needs a "
                          "tokenizer first)") from None
    x = x.reshape(len(xs), -1)
    y = _labels(np.asarray(ys, dtype=object), where, "y")
    return _finish(x, y, np.asarray(owners, dtype=np.int64), shape, where)


# ------------------------------------------------------------------------ reading

def _read_table(path: Path) -> pa.Table:
    where = f"{PARQUET_KEY}: {path}"
    if not path.exists():
        raise ConfigError(f"{where} not found")
    try:
        if path.is_dir():
            return ds.dataset(path, format="parquet").to_table()
        if path.suffix.lower() in _ARROW:
            return feather.read_table(path, memory_map=True)
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"{where}: cannot read it: {first_line(err)}") from None
    raise ConfigError(f"{where}: expected a .parquet/.pq file, a folder of them, or an "
                      f"Arrow IPC file ({', '.join(_ARROW)})")


def _leaf_files(path: Path, where: str) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ConfigError(f"{where}: the folder has no .json file")
        return files
    if not path.is_file():
        raise ConfigError(f"{where} not found")
    return [path]


def _leaf_json(file: Path, where: str) -> dict:
    try:
        blob = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: {file.name}: not readable JSON: {first_line(err)}") from None
    missing = [k for k in ("users", "num_samples", "user_data")
               if not isinstance(blob, dict) or k not in blob]
    if missing:
        raise ConfigError(f"{where}: {file.name}: lacks {', '.join(missing)} (LEAF's layout: "
                          "users, num_samples, user_data)")
    if len(blob["users"]) != len(blob["num_samples"]):
        raise ConfigError(f"{where}: {file.name}: {len(blob['users'])} users but "
                          f"{len(blob['num_samples'])} num_samples")
    return blob


# ------------------------------------------------------------------------ columns

def _samples(table: pa.Table, where: str, client: str, label: str,
             features: list[str] | None, shape: list[int] | None):
    names = table.column_names
    missing = [c for c in (client, label, *(features or ())) if c not in names]
    if missing:
        raise ConfigError(f"{where}: lacks column(s) {', '.join(missing)} (has "
                          f"{', '.join(names)})")
    columns = features if features is not None else [c for c in names if c not in
                                                      (client, label)]
    if not columns:
        raise ConfigError(f"{where}: no feature column (besides {client}, {label})")
    if table.column(client).null_count:
        raise ConfigError(f"{where}: column {client} has missing client ids")
    ids = table.column(client).to_numpy(zero_copy_only=False)
    _, owner = np.unique(ids, return_inverse=True)
    y = _labels(table.column(label).to_numpy(zero_copy_only=False), where, label)
    x, tensor_shape = _features(table, columns, where)
    return _finish(x, y, owner.astype(np.int64), shape or tensor_shape, where)


def _features(table: pa.Table, columns: list[str], where: str):
    """[n, F] float64 and, for a fixed-shape tensor column, its shape."""
    if len(columns) == 1 and _is_list(table.column(columns[0]).type):
        column = table.column(columns[0]).combine_chunks()
        kind = column.type
        shape = None
        if isinstance(kind, pa.FixedShapeTensorType):
            shape = list(kind.shape)
            column = column.storage
        if column.null_count:
            raise ConfigError(f"{where}: column {columns[0]} has missing samples")
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if lengths.size and (lengths != lengths[0]).any():
            raise ConfigError(f"{where}: column {columns[0]} holds lists of different lengths "
                              f"({int(lengths.min())} to {int(lengths.max())})")
        values = pc.list_flatten(column)
        if not _is_numeric(values.type):
            raise ConfigError(f"{where}: column {columns[0]} is not numeric ({values.type})")
        flat = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), -1), shape
    bad = [c for c in columns if not _is_numeric(table.column(c).type)]
    if bad:
        raise ConfigError(f"{where}: feature column {bad[0]} is not numeric "
                          f"({table.column(bad[0]).type}); name the features with "
                          "features: [...]")
    return np.column_stack([table.column(c).cast(pa.float64()).to_numpy(zero_copy_only=False)
                            for c in columns]), None


def _labels(values: np.ndarray, where: str, name: str) -> np.ndarray:
    if values.dtype.kind in "iu":
        if values.size and values.min() < 0:
            raise ConfigError(f"{where}: {name} has negative labels; expected classes 0..C-1")
        return values.astype(np.int64)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise ConfigError(f"{where}: {name} holds non-integer or missing labels")
        return _labels(values.astype(np.int64), where, name)
    if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        return _labels(values.astype(np.int64), where, name)
    if all(isinstance(v, str) for v in values):
        return np.unique(values.astype(str), return_inverse=True)[1].astype(np.int64)
    raise ConfigError(f"{where}: {name} must hold integer (or string) labels")


def _finish(x: np.ndarray, y: np.ndarray, owner: np.ndarray, shape: list[int] | None,
            where: str):
    from scenarios.datasets import Samples  # datasets registers these readers

    if not np.isfinite(x).all():
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ConfigError(f"{where}: sample {row} has a missing or non-finite feature")
    features = x.shape[1]
    if shape is not None and int(np.prod(shape)) != features:
        raise ConfigError(f"{where}: shape {list(shape)} holds {int(np.prod(shape))} values, "
                          f"the samples have {features}")
    classes = int(y.max()) + 1
    if classes < 2:
        raise ConfigError(f"{where}: one class only; a classifier needs at least 2")
    return Samples(x.astype(np.float32), y, owner, classes,
                   tuple(shape) if shape is not None else (features,))


def _is_list(dtype: pa.DataType) -> bool:
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
            or pa.types.is_fixed_size_list(dtype) or isinstance(dtype, pa.FixedShapeTensorType))


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype)


def write_examples(folder: Path, n: int) -> None:
    """Example files in both layouts, for `n` clients (the compatibility matrix reads them):
    clients.parquet (client_id, label, a fixed-size list column `pixels`) and leaf.json;
    digits samples dealt round-robin, client k holding every n-th of the first 20 n."""
    from scenarios.datasets import load_digits_arrays

    x, y = load_digits_arrays()
    x, y = x[: 20 * n], y[: 20 * n]
    owner = np.arange(y.size) % n
    pq.write_table(pa.table({"client_id": owner, "label": y, "pixels": pa.FixedSizeListArray
                             .from_arrays(pa.array(x.reshape(-1)), x.shape[1])}),
                   folder / "clients.parquet")
    users = [f"f{k:04d}_{k}" for k in range(n)]
    (folder / "leaf.json").write_text(json.dumps({
        "users": users, "num_samples": [int((owner == k).sum()) for k in range(n)],
        "user_data": {u: {"x": x[owner == k].tolist(), "y": y[owner == k].tolist()}
                      for k, u in enumerate(users)}}))
