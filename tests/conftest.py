"""Shared fixtures: one real embedded Ray for the session, small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.core.config import ExperimentConfig, build_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray (2 CPUs, dashboard off, loopback), shared by the whole session."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from engine.backends.runtime import start_private_ray

    if not ray.is_initialized():
        start_private_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


SMALL = {
    "experiment": "test", "seed": 7, "rounds": 3, "eval_every": 1,
    "task": {"dataset": "digits", "model": {"kind": "mlp", "hidden": [32]}},
    "partition": {"kind": "dirichlet", "alpha": 0.5},
    "population": {"num_clients": 20, "participation": {"clients_per_round": 5}},
    "training": {"executor": "vmap", "local_epochs": 2, "batch_size": 8, "lr": 0.1},
}


def small_raw(**sections) -> dict:
    """SMALL with sections merged in (a dict section updates SMALL's, others replace)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in SMALL.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def small_config(**sections) -> ExperimentConfig:
    """A fast digits scenario: 20 clients (Dirichlet label skew), 5 per round, 3 rounds."""
    return build_config(small_raw(**sections))
