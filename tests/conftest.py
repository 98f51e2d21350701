"""Shared fixtures: one local Ray session for the whole test run (start-up costs 10-20 s)."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

# MLflow tracking costs ~5 s per run (import + a new SQLite store): off for the suite, on in the
# tests of tracking itself (tests/test_tracking.py, tests/test_tune.py), which unset this.
os.environ.setdefault("ATTRLAB_TRACKING", "0")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """Two Ray nodes on this machine (Ray's own cluster test utility): a head and a second raylet,
    2 logical CPUs each, so every Ray test runs multi-node; workers and replicas take fractional CPUs."""
    import ray
    from ray.cluster_utils import Cluster

    # Token auth stays at Ray's default for this test cluster (loopback only, torn down after).
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    node = {"num_cpus": 2, "object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(ray_cluster: object) -> Iterator[object]:
    """The shared Ray session (connected to the two-node ray_cluster)."""
    yield ray_cluster


@pytest.fixture(scope="session")
def world_of_one() -> None:
    """A gloo world of one for in-process DeepSpeed, kept for the session: DeepSpeed caches the
    process group it first sees, so destroying it would break later in-process runs
    (jobs.cli_train.run_local reuses it)."""
    from jobs.cli_train import world_of_one as start

    start("gloo")


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.figures import FIGURES

    if FIGURES:
        terminalreporter.section("figures measured by the fault and multi-node tests")
        for line in FIGURES:
            terminalreporter.write_line(line)
