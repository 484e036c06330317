"""Every registry's contract checker (engine/contracts.py) over every registered entry, with
a real Ray task as the other process; and the checkers catch plugins that break them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.contracts import CHECKERS, EXAMPLE_PARAMS, check, check_selection, check_stage
from policies.base import stage, stateless
from policies.selection import Selection

CASES = [(kind, name) for kind, (registry, _) in CHECKERS.items() for name in registry.names()]


def _call(fn, *args):
    return fn(*args)


@pytest.fixture(scope="module")
def ray_remote(ray_cluster):
    task = ray_cluster.remote(num_cpus=0)(_call)
    return lambda fn, *args: ray_cluster.get(task.remote(fn, *args))


def _params(kind: str, name: str, tmp_path) -> dict:
    if (kind, name) == ("availability", "trace"):
        path = tmp_path / "trace.csv"
        path.write_text("client_id,start,end\n" + "".join(f"{i},{i % 4},{i % 4 + 3}\n"
                                                           for i in range(40)))
        return {"path": str(path)}
    if (kind, name) == ("topology", "edge_list"):
        path = tmp_path / "edges.txt"
        path.write_text("".join(f"{i} {(i + 1) % 16}\n" for i in range(16)))
        return {"path": str(path)}
    if (kind, name) == ("dataset", "parquet"):
        path = tmp_path / "clients.csv.parquet"
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = np.random.default_rng(0)
        pq.write_table(pa.table({"client_id": np.arange(48) % 8, "label": np.arange(48) % 3,
                                 "a": rng.normal(size=48), "b": rng.normal(size=48)}), path)
        return {"path": str(path)}
    if (kind, name) == ("dataset", "leaf"):
        path = tmp_path / "leaf.json"
        users = [f"u{k}" for k in range(8)]
        path.write_text(json.dumps({"users": users, "num_samples": [3] * 8, "user_data": {
            u: {"x": [[k, j, 1.0] for j in range(3)], "y": [j % 2 for j in range(3)]}
            for k, u in enumerate(users)}}))
        return {"path": str(path)}
    return EXAMPLE_PARAMS.get((kind, name), {})


@pytest.mark.parametrize("kind, name", CASES, ids=[f"{k}:{n}" for k, n in CASES])
def test_every_registered_plugin_keeps_its_contract(kind, name, tmp_path, ray_remote):
    check(kind, name, _params(kind, name, tmp_path), remote=ray_remote)


def test_every_registry_has_a_checker():
    """Every registry the config resolves names through is checked."""
    from engine.resolve import SECTIONS

    checked = {id(registry) for registry, _ in CHECKERS.values()}
    assert {id(r) for r in SECTIONS.values()} <= checked


@stage("reduction")
def _first_row():
    """Takes the first client's update: order-dependent, though it claims it is not (2024)."""
    return stateless(lambda u: u.deltas[0])


@stage("reduction")
def _noisy():
    """Draws fresh noise every call (2024)."""
    return stateless(lambda u: u.deltas.mean(dim=0) + torch.randn(u.deltas.shape[1]))


def test_the_checkers_catch_broken_plugins():
    with pytest.raises(AssertionError, match="order of the clients"):
        check_stage(_first_row)
    with pytest.raises(AssertionError, match="other bits"):
        check_stage(_noisy)

    def unsorted():
        return Selection(lambda available, k, losses, rng: available[::-1][:k])

    with pytest.raises(AssertionError, match="sorted"):
        check_selection(unsorted)


def test_an_out_of_tree_plugin_is_checked_by_its_import_path():
    check("selection", "policies.selection:power_of_choice", {"candidates": 6})
    assert np.isfinite(1.0)
