"""docs/REPRODUCTIONS.md's entries stay runnable: every configs/papers file is accepted as it
stands, and every claim benchmarks/reproduce.py judges names runs its sweep has."""

from __future__ import annotations

import functools
import importlib.util

import pyarrow as pa
import pytest

from engine.analysis.summary import Runs, filter_runs
from engine.experiment import prepare
from engine.resolve import load
from engine.sweeps.sweep import load_sweep
from tests.conftest import ROOT

PAPERS = sorted((ROOT / "configs" / "papers").glob("*.yaml"))


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" /
                                                  "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep(path):
    return _loaded(str(path.resolve()))


@functools.cache  # each file once: the claims test reads the sweeps the first test loaded
def _loaded(path: str):
    return load_sweep(path)


def _is_sweep(path) -> bool:
    return any(line.startswith("base:") for line in path.read_text().splitlines())


@pytest.mark.parametrize("path", PAPERS, ids=lambda p: p.stem)
def test_every_paper_config_is_accepted(path):
    if _is_sweep(path):
        sweep = _sweep(path)
        assert not sweep.refused, sweep.refused[0].refused
        assert len({run.run_id for run in sweep.runs}) == len(sweep.runs) > 1
    else:
        prepare(load(path))


def test_every_claim_compares_runs_of_its_sweep():
    reproduce = _reproduce()
    names = [entry.name for entry in reproduce.ENTRIES]
    assert len(names) == len(set(names)) >= 20
    for entry in reproduce.ENTRIES:
        sweep = _sweep(entry.sweep)
        assert entry.checks or entry.name == "ranking"
        # the sweep's runs as analyze sees them: their swept columns, typed as the logs are
        columns = sorted({k for run in sweep.runs for k in run.constants})
        table = pa.table({"run_id": [run.run_id for run in sweep.runs], **{
            c: [run.constants[c].as_py() if c in run.constants else None for run in sweep.runs]
            for c in columns}})
        runs = Runs(table, [{}] * len(sweep.runs), columns)
        for check in entry.checks:
            assert check.better in ("higher", "lower", "similar")
            method, baseline = (filter_runs(runs, reproduce.sides(side)).summary["run_id"]
                                for side in (check.method, check.baseline))
            assert not set(method.to_pylist()) & set(baseline.to_pylist()), entry.name
