"""Shared fixtures: one local Ray session for the whole test run (start-up costs 10-20 s)."""
from __future__ import annotations

import os
from typing import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_session() -> Iterator[object]:
    import ray

    # 4 logical CPUs on a 2-core box: workers and replicas take fractional CPUs.
    # Token auth stays at Ray's default for this test cluster (loopback only, torn down after).
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                   runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield ctx
    ray.shutdown()
