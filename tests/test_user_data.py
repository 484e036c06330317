"""Users' own federated data: `task.dataset: parquet` and `leaf` on small files written here,
read back to known values, run end to end as the README shows, and bad files refused in one
line naming the file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from engine.core.errors import ConfigError
from scenarios.datasets import DATASETS
from tests.conftest import ROOT

RNG = np.random.default_rng(0)
DIGITS = str(ROOT / "configs" / "digits.yaml")


def _load(name: str, **params):
    return DATASETS.make(name, f"task.{name}", None, **params)(4, RNG)


def test_parquet_columns_give_the_samples_their_clients_and_labels(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"who": ["bo", "al", "bo", "cy", "al"],
                             "label": ["cat", "dog", "dog", "cat", "ant"],
                             "f1": [0.5, 1.0, 1.5, 2.0, 2.5], "f2": [1, 2, 3, 4, 5],
                             "note": ["x"] * 5}), path)
    x, y, owner, classes, shape = _load("parquet", path=str(path), client="who",
                                        features=["f2", "f1"])
    assert x.dtype == np.float32 and x.tolist() == [[1, 0.5], [2, 1], [3, 1.5], [4, 2], [5, 2.5]]
    assert owner.tolist() == [1, 0, 1, 2, 0]  # al, bo, cy in sorted order
    assert y.tolist() == [1, 2, 2, 1, 0] and classes == 3  # ant, cat, dog
    assert shape == (2,)
    with pytest.raises(ConfigError, match="feature column note is not numeric"):
        _load("parquet", path=str(path), client="who")  # every other column: note too


def test_arrow_tensor_column_and_parquet_folder(tmp_path):
    images = np.arange(6 * 4, dtype=np.float32).reshape(6, 2, 2)
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(images)
    feather.write_feather(pa.table({"client_id": [3, 3, 7, 7, 9, 9], "label": [0, 1] * 3,
                                    "image": tensor}), tmp_path / "c.arrow")
    x, y, owner, classes, shape = _load("parquet", path=str(tmp_path / "c.arrow"))
    assert shape == (2, 2) and np.array_equal(x, images.reshape(6, 4))
    assert owner.tolist() == [0, 0, 1, 1, 2, 2] and classes == 2
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(2):  # a folder of Parquet files reads as one table
        pq.write_table(pa.table({"client_id": [i, i], "label": [0, 1],
                                 "x": pa.array([[1.0, 2.0], [3.0, 4.0]])}),
                       folder / f"part-{i}.parquet")
    x, _, owner, _, shape = _load("parquet", path=str(folder), shape=[1, 2])
    assert x.shape == (4, 2) and sorted(owner.tolist()) == [0, 0, 1, 1] and shape == (1, 2)


def _leaf_file(path, users, per_user, start=0):
    path.write_text(json.dumps({"users": users, "num_samples": [per_user] * len(users),
                                "user_data": {u: {"x": [[k + start, j] for j in range(per_user)],
                                                  "y": [j % 3 for j in range(per_user)]}
                                              for k, u in enumerate(users)}}))


def test_leaf_folder_merges_a_user_split_across_files(tmp_path):
    _leaf_file(tmp_path / "all_data_0.json", ["f_a", "f_b"], 3)
    _leaf_file(tmp_path / "all_data_1.json", ["f_c", "f_a"], 2, start=10)
    x, y, owner, classes, shape = _load("leaf", path=str(tmp_path))
    assert owner.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 0, 0]  # f_a, f_b, then f_c; f_a again
    assert x[:, 0].tolist() == [0, 0, 0, 1, 1, 1, 10, 10, 11, 11]
    assert y.tolist() == [0, 1, 2] * 2 + [0, 1] * 2 and classes == 3 and shape == (2,)


@pytest.mark.parametrize("write, key, message", [
    (lambda p: p.write_text("{not json"), "leaf", "not readable JSON"),
    (lambda p: p.write_text(json.dumps({"users": ["a"], "num_samples": [2],
                                        "user_data": {"a": {"x": [[1]], "y": [0, 1]}}})),
     "leaf", "user 'a' has 1 x, 2 y and num_samples 2"),
    (lambda p: p.write_text(json.dumps({"users": ["a"], "num_samples": [2], "user_data": {
        "a": {"x": ["some text", "more"], "y": [0, 1]}}})), "leaf", "tokenizer"),
    (lambda p: p.write_text(json.dumps({"users": ["a"], "user_data": {}})), "leaf",
     "lacks num_samples"),
    (lambda p: pq.write_table(pa.table({"client_id": [0, 1], "y": [0, 1], "x": [1.0, 2.0]}),
                              p), "parquet", "lacks column.s. label"),
    (lambda p: pq.write_table(pa.table({"client_id": [0, 1], "label": [0, 1],
                                        "x": pa.array([[1.0], [2.0, 3.0]])}), p),
     "parquet", "lists of different lengths"),
    (lambda p: pq.write_table(pa.table({"client_id": [0, 1], "label": [0, 1],
                                        "x": [1.0, float("nan")]}), p),
     "parquet", "sample 1 has a missing or non-finite feature"),
    (lambda p: pq.write_table(pa.table({"client_id": [0, 1], "label": [-1, 1],
                                        "x": [1.0, 2.0]}), p), "parquet", "negative labels"),
    (lambda p: p.write_text("plain text"), "parquet", "cannot read it"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, write, key, message):
    path = tmp_path / ("data.json" if key == "leaf" else "data.parquet")
    write(path)
    with pytest.raises(ConfigError, match=message) as err:
        _load(key, path=str(path))
    assert f"task.{key}.path: {path}" in str(err.value) and "\n" not in str(err.value)


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_both_formats_run_then_analyze_as_in_the_readme(tmp_path):
    """The README's commands on files written here: each client's samples stay its own
    (partition natural), the run logs its rounds, analyze reads them back."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    owner = np.repeat(np.arange(6), 20)
    pq.write_table(pa.table({"client_id": owner, "label": y,
                             **{f"f{j}": x[:, j] for j in range(6)}}), tmp_path / "mine.parquet")
    users = [f"user{k}" for k in range(6)]
    (tmp_path / "leaf").mkdir()
    (tmp_path / "leaf" / "train.json").write_text(json.dumps({
        "users": users, "num_samples": [20] * 6, "user_data": {
            u: {"x": x[owner == k].tolist(), "y": y[owner == k].tolist()}
            for k, u in enumerate(users)}}))
    common = ["partition.kind=natural", "population.num_clients=6",
              "population.participation.clients_per_round=3", "task.model.kind=logistic",
              "rounds=4", "eval_every=2", "--backend", "inline", "--no-progress"]
    for name, path in (("parquet", "mine.parquet"), ("leaf", "leaf")):
        done = _run(DIGITS, f"task.dataset={name}", f"task.{name}.path={path}",
                    f"experiment=own_{name}", *common, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        summary = _run("analyze", f"logs/own_{name}", "--metric", "final_accuracy",
                       "--format", "csv", cwd=tmp_path)
        assert summary.returncode == 0, summary.stderr
        accuracy = float(summary.stdout.splitlines()[1].split(",")[-1])
        assert 0.5 < accuracy <= 1.0  # a linear rule the logistic model can learn
    bad = _run(DIGITS, "task.dataset=parquet", "task.parquet.path=missing.pq", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "task.parquet.path: missing.pq not found" in bad.stderr
