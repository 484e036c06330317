"""The client data store (scenarios/store.py): the same bits as drawing the data whole, rows by
client from a memory map, a content-addressed cache that is reused and never half-written."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from engine.backends.runtime import RuntimeOptions
from engine.core.errors import ConfigError
from engine.core.seeds import SeedTree
from engine.experiment import run_experiment
from engine.records.logs import read_table
from engine.resolve import build_task
from scenarios import store as store_module
from scenarios.datasets import Samples, _client_counts, synthetic_leaf
from scenarios.partition import PARTITIONS
from scenarios.store import cached, lookup, open_store, write_rows, write_store
from tests.conftest import small_config


def _synthetic_whole(alpha, beta, f, c, counts, rng):
    """LEAF Synthetic(alpha, beta) drawn for all clients at once, in the order the FedProx
    reference generator draws (an independent, unblocked implementation)."""
    n = counts.size
    owner = np.repeat(np.arange(n), counts)
    u = rng.normal(0.0, alpha, n)
    b = rng.normal(0.0, beta, n)
    w = rng.normal(u[:, None, None], 1.0, (n, c, f))
    bias = rng.normal(u[:, None], 1.0, (n, c))
    v = rng.normal(b[:, None], 1.0, (n, f))
    x = v[owner] + rng.standard_normal((owner.size, f)) * np.arange(1, f + 1.0) ** -0.6
    y = np.array([np.argmax(w[o] @ xi + bias[o]) for o, xi in zip(owner, x, strict=True)])
    return x.astype(np.float32), y


@pytest.mark.parametrize("block_rows", [1, 37, 1 << 20])
def test_synthetic_blocks_draw_the_same_bits_as_all_at_once(block_rows):
    counts = _client_counts(12, 0.8, 60, np.random.default_rng(1))
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    x0, y0 = _synthetic_whole(0.5, 0.5, 7, 4, counts, a)
    blocks = list(synthetic_leaf(0.5, 0.5, 7, 4, counts, b, block_rows))
    assert (len(blocks) == 1) == (block_rows > counts.sum())
    assert np.array_equal(np.concatenate([x for x, _ in blocks]), x0)
    # argmax of float64 logits: the loop's matrix-vector products may differ in the last bit
    # from einsum's, never enough to change a label here
    assert np.array_equal(np.concatenate([y for _, y in blocks]), y0)
    assert a.random() == b.random()  # the generator ends where it did: later draws agree


def _known(n_clients=5, per=6, features=3):
    """Samples whose features name them: x[i] = (i, i, i), owner i // per, label i % 3."""
    n = n_clients * per
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], features, axis=1)
    return Samples(x, np.arange(n) % 3, np.arange(n) // per, 3, (features,))


def test_the_store_holds_train_rows_by_client_and_the_held_out_rest(tmp_path):
    seeds = SeedTree(0)
    write_store(tmp_path, _known(), 5, PARTITIONS.make("natural"), seeds, seeds.rng("data"),
                0.5, 100, validation_fraction=0.34)
    store = open_store(tmp_path)
    x, y = store.open().read(np.array([0]), np.array([store.sizes.sum()]))
    x_test, _ = store.split("test")
    x_val, _ = store.split("val")
    ids = np.concatenate([x[:, 0], x_test[:, 0], x_val[:, 0]]).astype(int)
    assert sorted(ids) == list(range(30))  # every sample once: train, test or validation
    owner = np.repeat(np.arange(5), store.sizes)
    assert np.array_equal(x[:, 0].astype(int) // 6, owner)  # natural: each keeps its own
    assert all(np.all(np.diff(x[owner == c, 0]) > 0) for c in range(5))  # in sample order
    assert np.array_equal(y, x[:, 0].astype(int) % 3)
    assert store.sizes.tolist() == [2] * 5  # 6 each: 3 to test, then 1 of 3 to validation


def test_rows_are_read_across_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "BATCH_BYTES", 40)  # about 3 rows of 3 floats a batch
    seeds = SeedTree(0)
    write_store(tmp_path, _known(8, 4), 8, PARTITIONS.make("natural"), seeds,
                seeds.rng("data"), 0.25, 100)
    store = open_store(tmp_path)
    reader = store.open()
    assert len(reader._x) == 8  # whole clients: one (3 rows) per batch
    clients = np.array([6, 1, 3])
    x, y = reader.read(store.offsets[clients], store.sizes[clients])
    assert np.array_equal(x[:, 0].astype(int) // 4, np.repeat(clients, 3))
    assert x.flags.writeable  # a private copy


def test_the_cache_is_reused_and_keyed_by_what_makes_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCORD_DATA_CACHE", str(tmp_path))
    first = build_task(small_config())
    again = build_task(small_config())
    other = build_task(small_config(seed=8))
    assert first.store.built_s is not None and again.store.built_s is None  # not drawn again
    assert again.store.path == first.store.path != other.store.path
    assert np.array_equal(first.data.y_test, again.data.y_test)
    meta = json.loads((first.store.path / "meta.json").read_text())
    assert meta["key"]["seed"] == 7 and meta["key"]["num_clients"] == 20


def test_an_edited_user_file_is_a_new_store(tmp_path, monkeypatch):
    from scenarios.user_data import write_examples

    monkeypatch.setenv("CONCORD_DATA_CACHE", str(tmp_path / "cache"))
    write_examples(tmp_path, 6)
    cfg = small_config(task={"dataset": "leaf", "leaf": {"path": str(tmp_path / "leaf.json")}},
                       partition={"kind": "natural"}, population={"num_clients": 6})
    first = build_task(cfg)
    text = (tmp_path / "leaf.json").read_text()
    (tmp_path / "leaf.json").write_text(text.replace("[0.0,", "[1.0,", 1))
    assert build_task(cfg).store.path != first.store.path


def test_a_failed_build_leaves_nothing_and_a_raced_one_keeps_the_first(tmp_path):
    def broken(folder):
        (folder / "train.arrow").write_text("half")
        raise ConfigError("task.x: bad")

    with pytest.raises(ConfigError):
        cached({"k": 1}, broken, tmp_path)
    assert list(tmp_path.iterdir()) == [] and lookup({"k": 1}, tmp_path) is None

    seeds = SeedTree(0)

    def build(folder):
        write_store(folder, _known(), 5, PARTITIONS.make("natural"), seeds, seeds.rng("data"),
                    0.5, 100)

    def racing(folder):  # another run finishes the same store while this one builds
        cached({"k": 2}, build, tmp_path)
        build(folder)

    store = cached({"k": 2}, racing, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]
    assert store.sizes.sum() == 15


def test_reading_rows_each_round_gives_the_bits_of_resident_rows(tmp_path, monkeypatch):
    """A shard over RESIDENT_BYTES reads its round's clients from the memory map; below, it
    holds its rows: the same run's logs agree bit for bit (with label flipping, whose labels
    are flipped as they are read, and FedDisco, which reads label counts)."""
    from engine.compute import pool

    cfg = small_config(rounds=2, attack={"kind": "label_flip", "fraction": 0.25},
                       aggregation=["feddisco", "fedavg"])
    inline = RuntimeOptions("inline", 2)
    run_experiment(cfg, inline, tmp_path / "resident", False)
    monkeypatch.setattr(pool, "RESIDENT_BYTES", 0)
    run_experiment(cfg, inline, tmp_path / "mapped", False)
    a, b = (read_table(tmp_path / side / "test", "rounds") for side in ("resident", "mapped"))
    assert a["train_loss"].to_pylist() == b["train_loss"].to_pylist()
    assert a["test_loss"].to_pylist() == b["test_loss"].to_pylist()



def test_a_round_is_split_by_samples_into_runs_of_ids_unless_pools_keep_client_state():
    from engine.backends.runtime import RoundSplit, balanced_split
    from engine.compute.pool import ClientPool, PoolSpec
    from engine.compute.training import EXECUTORS, LocalSGD

    sizes = np.array([5, 1, 1, 1, 1, 1, 10, 2])
    parts, bounds = balanced_split(np.array([0, 1, 2, 6, 7]), sizes, 2)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [6, 7]]  # 7 and 12 samples
    assert bounds.tolist() == [0, 4, 8]  # the cut at the most aligned id in 3..6
    parts, bounds = balanced_split(np.array([6]), sizes, 3)  # fewer clients than pools
    assert [p.tolist() for p in parts] == [[], [], [6]] and bounds.tolist() == [0, 0, 0, 8]
    parts, bounds = balanced_split(np.array([1, 2, 9, 12]), np.ones(16, np.int64), 2)
    assert [p.tolist() for p in parts] == [[1, 2], [9, 12]] and bounds.tolist() == [0, 8, 16]

    task = build_task(small_config())
    stateless = PoolSpec(task.model, LocalSGD(1, 8, 0.1), EXECUTORS["vmap"], 0)
    scaffold = dataclasses.replace(stateless, hp=LocalSGD(1, 8, 0.1, scaffold=True))
    shards = np.array([0, 10, 20])
    ids = np.arange(20)
    even = RoundSplit(task, stateless, ClientPool, shards)(ids, None)
    owned = RoundSplit(task, scaffold, ClientPool, shards)(ids, None)
    assert [span for *_, span in owned] == [(0, 10), (10, 1 << 48)]  # no id past the last
    assert [p.tolist() for p, *_ in owned] == [list(range(10)), list(range(10, 20))]
    halves = [int(task.client_sizes[p].sum()) for p, *_ in even]
    assert abs(halves[0] - halves[1]) <= task.client_sizes.max()  # dirichlet sizes: uneven ids
    assert even[0][0][-1] < even[0][2][1] == even[1][2][0] <= even[1][0][0]


def test_a_pool_that_cannot_see_the_store_says_so(tmp_path):
    store = write_rows(tmp_path / "s", np.zeros((4, 3), np.float32), np.arange(4) % 2,
                       np.array([2, 2]), 2, (3,))
    shutil.rmtree(store.path)
    with pytest.raises(ConfigError, match=r"is not on this machine .*CONCORD_DATA_CACHE"):
        store.open()
