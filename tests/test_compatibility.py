"""The compatibility matrix (engine/compatibility.py): docs/COMPATIBILITY.md is what the code
generates, at most 5% of applicable cells are refused, and every allowed cell runs two
rounds on the tiny task, inline, with finite results; every fourth covering run is checked to
give the same bits on Ray with 2 pools (pool actors kept from run to run). Rows come from
the registries: a new plugin is covered the day it is registered."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import compatibility as compat
from engine.backends.runtime import RuntimeOptions, drop_kept_hosts
from engine.core.errors import ConfigError
from engine.experiment import run_experiment
from engine.records.logs import read_table
from tests.conftest import ROOT

COLUMNS = ["round", "num_updates", "train_loss", "test_accuracy", "consensus_distance",
           "virtual_time"]


@pytest.fixture(scope="module", autouse=True)
def _free_kept_hosts():
    """The Ray runs here keep their pool actors; later modules need those CPUs back."""
    yield
    import ray

    if ray.is_initialized():
        drop_kept_hosts()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    files = compat.write_inputs(tmp_path_factory.mktemp("inputs"))
    return compat.matrix(files), files


def test_the_document_is_what_the_code_generates(matrix):
    m, _ = matrix
    doc = (ROOT / "docs" / "COMPATIBILITY.md").read_text()
    assert doc == compat.render(m) + "\n", \
        "regenerate: python run.py plugins --write-matrix docs/COMPATIBILITY.md"


def test_at_most_five_percent_of_applicable_cells_are_refused(matrix):
    allowed, refused, _ = matrix[0].counts()
    assert refused <= 0.05 * (allowed + refused)
    for (kind, name, _), cell in matrix[0].cells.items():
        if cell.status == "refused":  # one line, naming the config key
            assert "\n" not in cell.reason and cell.reason.split(":")[0], (kind, name)


def _run(protocol, sections, files, options, root):
    cfg = compat.config_of(protocol, sections, files)
    result = run_experiment(cfg, options, root, False)
    rounds = read_table(result.log_dir, "rounds").sort_by("round")
    return result, rounds.select([c for c in COLUMNS if c in rounds.column_names])


@pytest.mark.parametrize("protocol", compat.PROTOCOLS, ids=compat.NAMES)
def test_every_allowed_cell_runs_inline_and_the_same_on_ray(protocol, matrix, tmp_path,
                                                            ray_cluster):
    m, files = matrix
    runs = []
    for run in compat.covering_runs(m, protocol.label):
        sections = compat.combined_sections(run)
        if sections is None or compat.refusal(protocol, sections, files):
            runs += [[row] for row in run]  # split: one run per row
        else:
            runs.append(run)
    covered = {(row.kind, row.name) for run in runs for row in run}
    assert covered == {(r.kind, r.name) for r in m.allowed(protocol.label)}
    ray = RuntimeOptions("ray", 2, reuse_actors=True)
    for i, run in enumerate(runs):
        sections = compat.combined_sections(run) if len(run) > 1 else [run[0].sections]
        label = [f"{r.kind}={r.name}" for r in run]
        try:
            inline, rows = _run(protocol, sections, files, RuntimeOptions("inline", 1),
                                tmp_path / f"i{i}")
        except ConfigError as err:  # allowed alone, so it must run alone
            raise AssertionError(f"{protocol.label} {label}: {err}") from None
        params = inline.loop.params.numpy()
        assert np.isfinite(params).all(), label
        assert math.isfinite(inline.loop.final_accuracy), label
        if i % 4:  # a sample on Ray: every fourth covering run
            continue
        on_ray, ray_rows = _run(protocol, sections, files, ray, tmp_path / f"r{i}")
        assert rows.equals(ray_rows), label
        np.testing.assert_array_equal(params, on_ray.loop.params.numpy(), err_msg=str(label))
