"""Pickling live state, leaving some objects out by reference.

A checkpoint pickles a round loop (or a pool) whole: its models, policies' states, world
models, event queues, generators, closures (cloudpickle pickles those by value). The objects
that are rebuilt, not saved (pools, the logger, the evaluator; a pool's data and trainer) are
written as a name (`persistent_id`) and, on loading, replaced by the live object of that name.
So no class needs code of its own to be checkpointed, and what a checkpoint holds is exactly
what the run would have gone on with.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cloudpickle


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file, by_name: Mapping[int, str]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._by_name = by_name

    def persistent_id(self, obj: Any) -> str | None:
        return self._by_name.get(id(obj))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, live: Mapping[str, Any]) -> None:
        super().__init__(file)
        self._live = live

    def persistent_load(self, name: str) -> Any:
        return self._live[name]


def dumps(obj: Any, leave_out: Mapping[str, Any]) -> bytes:
    """`obj` pickled, with each object of `leave_out` (name -> object) written as its name."""
    buffer = io.BytesIO()
    _Pickler(buffer, {id(v): k for k, v in leave_out.items()}).dump(obj)
    return buffer.getvalue()


def loads(data: bytes, live: Mapping[str, Any]) -> Any:
    """The object of `dumps`, the left-out names bound to `live`'s objects."""
    return _Unpickler(io.BytesIO(data), live).load()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one,
    never half of one: a temporary file in the same folder, synced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
