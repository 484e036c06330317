"""Shared fixtures: one real embedded Ray for the session, small configs."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine.core.config import ExperimentConfig, apply_override, build_config

ROOT = Path(__file__).resolve().parents[1]

# The client data stores the tests build (scenarios/store.py) go to a private cache, shared by
# the session's tests and the run.py subprocesses they start, removed at its end.
_CACHE = None
if "CONCORD_DATA_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="concord-data-")
    os.environ["CONCORD_DATA_CACHE"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs, dashboard off, loopback), shared by the whole session."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from engine.backends.runtime import start_private_ray

    if not ray.is_initialized():
        start_private_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    from engine.backends.runtime import drop_kept_hosts

    drop_kept_hosts()  # pool hosts kept by tests that reuse them (reuse_actors=True)
    ray.shutdown()


SMALL = {
    "experiment": "test", "seed": 7, "rounds": 3, "eval_every": 1,
    "task": {"dataset": "digits", "model": {"kind": "mlp", "hidden": [32]}},
    "partition": {"kind": "dirichlet", "alpha": 0.5},
    "population": {"num_clients": 20, "participation": {"clients_per_round": 5}},
    "training": {"executor": "vmap", "local_epochs": 2, "batch_size": 8, "lr": 0.1},
}


def small_raw(**sections) -> dict:
    """SMALL with sections merged in: each key of a dict section is set as an override would
    set it (a plugin's new kind keeps the old kind's parameters under the old name); other
    values replace."""
    from engine.resolve import CATALOG

    raw = copy.deepcopy(SMALL)
    for key, value in sections.items():
        if isinstance(value, dict):
            for inner, item in value.items():
                apply_override(raw, [key, inner], item, CATALOG)
        else:
            raw[key] = value
    return _fitted(raw, sections)


def _fitted(raw: dict, sections: dict) -> dict:
    """SMALL's settings that only some protocols consume (engine/protocols), dropped for the
    others unless the caller set them: K clients per round (sync FL and sync gossip), local
    epochs (not asynchronous gossip, whose steps are clock events)."""
    peers = raw.get("mode") == "decentralized"
    clocks = peers and raw.get("gossip", {}).get("mode") == "async"
    modest = peers and "modest" in str(raw.get("consensus", ""))
    asynchronous = not peers and raw.get("server", {}).get("mode", "sync") != "sync"
    if (clocks or modest or asynchronous) and "participation" not in sections.get(
            "population", {}):
        raw["population"].pop("participation", None)
    if clocks and "local_epochs" not in sections.get("training", {}):
        raw["training"].pop("local_epochs", None)
    return raw


def small_config(**sections) -> ExperimentConfig:
    """A fast digits scenario: 20 clients (Dirichlet label skew), 5 per round, 3 rounds."""
    return build_config(small_raw(**sections))
