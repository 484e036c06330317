"""docs/REPRODUCTIONS.md's entries stay runnable: every configs/papers file is accepted as it
stands, and every claim benchmarks/reproduce.py judges names runs its sweep has."""

from __future__ import annotations

import importlib.util

import pytest

from engine.analysis.summary import parse_filter
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


def _is_sweep(path) -> bool:
    return any(line.startswith("base:") for line in path.read_text().splitlines())


@pytest.mark.parametrize("path", PAPERS, ids=lambda p: p.stem)
def test_every_paper_config_is_accepted(path):
    if _is_sweep(path):
        sweep = load_sweep(path)
        assert not sweep.refused, sweep.refused[0].refused
        assert len({run.run_id for run in sweep.runs}) == len(sweep.runs) > 1
    else:
        prepare(load(path))


def test_every_claim_compares_runs_of_its_sweep():
    reproduce = _reproduce()
    names = [entry.name for entry in reproduce.ENTRIES]
    assert len(names) == len(set(names)) >= 13
    for entry in reproduce.ENTRIES:
        sweep = load_sweep(entry.sweep)
        assert entry.checks or entry.name == "ranking"
        for check in entry.checks:
            assert check.better in ("higher", "lower")
            for side in (check.method, check.baseline):
                wanted = parse_filter(side)
                values = [run.params.get(wanted.key) for run in sweep.runs]
                assert wanted.value in values, f"{entry.name}: no run with {side} ({values})"
            assert check.method != check.baseline
