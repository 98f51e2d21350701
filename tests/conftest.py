"""Shared fixtures: one local Ray session for the whole test run (start-up costs 10-20 s)."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

# MLflow tracking costs ~5 s per run (import + a new SQLite store): off for the suite, on in the
# tests of tracking itself (tests/test_tracking.py, tests/test_tune.py), which unset this.
os.environ.setdefault("ATTRLAB_TRACKING", "0")


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


@pytest.fixture(scope="session")
def tiny_attrworld(tmp_path_factory: pytest.TempPathFactory):
    """A 96-image, 32 px attrworld shard set shared by the training tests."""
    from shards.datasets import BuildOptions, plan_embedded
    from shards.writer import write_dataset

    out = tmp_path_factory.mktemp("data") / "attrworld"
    plan = plan_embedded("attrworld", BuildOptions(seed=0, size=32, count=96, options={
        "images_per_identity": "8", "pairs_per_attribute": "200", "clutter": "4"}))
    write_dataset(plan, out, shard_size=16, workers=1, progress=False)
    return out
