"""Multi-node training and the faults a training run survives, on the two-node test cluster
(tests/conftest.py: a head and a second raylet on this machine). Each test prints its figure.

- one worker per node gives the same result as both workers on one node;
- a worker SIGKILLed mid-interval: the run completes, losing at most one checkpoint interval;
- the driver SIGKILLed: re-running `attrlab train` with the same run directory resumes;
- corrupt shards mid-run: skipped and counted, the run completes;
- a full or unwritable checkpoint disk: one clear error line, the previous checkpoint intact.
The disk tests use a real small tmpfs (root with CAP_SYS_ADMIN, as on our CI machines); without
mount rights they fall back to checkpoint.min_free_mb / a read-only chmod to create the same state.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.figures import figure

from jobs.checkpoints import FAULT_MARKER, STAGING, dir_bytes, find_checkpoints, read_state
from tests.test_train import SMALL, steps_logged, train

pytestmark = pytest.mark.slow


def log_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/main"] for r in log_rows(run) if "loss/main" in r}


def still_for(run: Path, quiet_s: float, timeout: float) -> None:
    """Wait until nothing under `run` (log lines, checkpoint files) has changed for `quiet_s` seconds."""
    def state() -> list[tuple[str, int]] | None:
        try:
            return sorted((str(f), f.stat().st_size) for f in run.rglob("*") if f.is_file())
        except FileNotFoundError:  # a checkpoint rotated away while listing: still changing
            return None

    deadline, last, since = time.monotonic() + timeout, state(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, f"{run} still changing {timeout:.0f} s after the driver was killed"
        time.sleep(0.5)
        now = state()
        if now != last:
            last, since = now, time.monotonic()


def worker_nodes(run: Path) -> list[set[str]]:
    """The set of Ray node ids of each attempt of the worker group (RUN_DIR/workers.jsonl)."""
    rows = [json.loads(x) for x in (run / "workers.jsonl").read_text().splitlines()]
    return [{r["node_id"] for r in row["ranks"]} for row in rows]


def test_one_worker_per_node_matches_a_single_node_run(ray_cluster: object, tiny_attrworld: Path,
                                                       tmp_path: Path) -> None:
    import ray

    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    spread, packed = tmp_path / "spread", tmp_path / "packed"
    for run, strategy in ((spread, "STRICT_SPREAD"), (packed, "STRICT_PACK")):
        assert train(tiny_attrworld, run, "--workers", "2", "--max-steps", "4",
                     "--set", f"scaling.placement_strategy={strategy}") == 0
    assert worker_nodes(spread) == [alive]  # both nodes took part, one rank each
    assert len(worker_nodes(packed)[0]) == 1
    a, b = losses(spread), losses(packed)
    worst = max(abs(a[s] - b[s]) / max(1.0, abs(b[s])) for s in b)
    va = read_state(find_checkpoints(spread)[-1])["metrics"]["val/rank_acc"]
    vb = read_state(find_checkpoints(packed)[-1])["metrics"]["val/rank_acc"]
    figure(f"[multi-node] 2 nodes vs 1 node: max relative loss difference {worst:.2e} over {len(b)} steps; "
          f"val rank_acc {va:.4f} vs {vb:.4f}")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert worst < 1e-3 and abs(va - vb) < 0.02


def test_worker_killed_mid_interval_loses_at_most_one_interval(ray_session: object, tiny_attrworld: Path,
                                                               tmp_path: Path) -> None:
    run = tmp_path / "killed"
    staging_before = set(Path(tempfile.gettempdir()).glob(f"{STAGING}*"))
    # rank 0 SIGKILLs itself at step 3 (between the checkpoints at 2 and 4), once
    assert train(tiny_attrworld, run, "--workers", "2", "--max-steps", "6",
                 "--set", "checkpoint.fail_at_step=3", "--set", "checkpoint.max_failures=1") == 0
    assert (run / FAULT_MARKER).exists()
    logged = steps_logged(run)
    redone = len(logged) - len(set(logged))
    figure(f"[worker killed] at step 3, checkpoint interval 2: {redone} step(s) re-trained; "
          f"worker group started {len(worker_nodes(run))} times")
    assert logged == [1, 2, 3, 3, 4, 5, 6]  # step 3 re-run from step 2's checkpoint: 1 step <= 1 interval
    assert len(worker_nodes(run)) == 2  # the group really restarted (a new attempt was recorded)
    assert read_state(find_checkpoints(run)[-1])["step"] == 6
    # rank 1 died inside step 4's checkpoint (blocked in ray.train.report when the group was torn
    # down): its staging directory is swept (restarted group / driver), not left in /tmp. A live
    # worker may still be leaving its own `with TemporaryDirectory` on a loaded machine: wait.
    deadline = time.monotonic() + 60
    while (left := set(Path(tempfile.gettempdir()).glob(f"{STAGING}*")) - staging_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, left


def test_driver_killed_then_rerun_resumes(ray_cluster: object, tiny_attrworld: Path, tmp_path: Path) -> None:
    run = tmp_path / "driver"
    cmd = [sys.executable, "-m", "jobs.cli", "train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(run),
           "--workers", "2", "--max-steps", "40", *SMALL]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}  # type: ignore[attr-defined]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not [c for c in find_checkpoints(run) if read_state(c)["step"] >= 4]:
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Ray tears the dead driver's Train workers down asynchronously: one of them may still log a step or
    # write a checkpoint for a moment, so read the run only once it has been still for 5 s
    still_for(run, 5.0, timeout=90.0)
    killed_at = max(steps_logged(run))
    saved = read_state(find_checkpoints(run)[-1])["step"]
    assert train(tiny_attrworld, run, "--workers", "2", "--max-steps", str(saved + 4)) == 0
    logged = steps_logged(run)
    resumed_from = logged[killed_at] - 1  # the first step the re-run logged, minus one
    figure(f"[driver killed] at step {killed_at}; re-run resumed from the step {resumed_from} checkpoint "
          f"({killed_at - resumed_from} step(s) re-trained; the newest on disk was step {saved})")
    # Ray resumes from the newest checkpoint it registered: the one on disk, or the one before it when
    # the driver died between the upload and the registration
    assert resumed_from in (saved, saved - 2) and resumed_from >= 2
    assert logged[killed_at:] == list(range(resumed_from + 1, saved + 5))


def _corrupt(src: Path, dst: Path) -> int:
    """dst = src with the first image of every pair-train shard zeroed (same length, so the tar
    stays readable and the image does not) and the last pair-train shard truncated; returns how
    many images were zeroed."""
    shutil.copytree(src, dst)
    shards = sorted(dst.glob("pairs-train-*.tar"))
    zeroed = 0
    for shard in shards[:-1]:
        with tarfile.open(shard) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith((".jpg", ".png")))
        with open(shard, "r+b") as f:
            f.seek(member.offset_data)
            f.write(b"\0" * member.size)
        zeroed += 1
    shards[-1].write_bytes(shards[-1].read_bytes()[:1500])
    return zeroed


def test_corrupt_shards_are_skipped_and_counted(ray_session: object, tiny_attrworld: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    zeroed = _corrupt(tiny_attrworld, bad)
    run = tmp_path / "run"
    assert train(bad, run, "--workers", "2", "--max-steps", "6", "--set", "data.loader.shuffle_buffer=4") == 0
    skipped = log_rows(run)[-1]["data/skipped"]
    figure(f"[corrupt shards] {zeroed} zeroed images + 1 truncated shard: {skipped} sample(s) skipped and counted, "
          f"run completed at step {read_state(find_checkpoints(run)[-1])['step']}")
    assert skipped >= 1 and read_state(find_checkpoints(run)[-1])["step"] == 6


# ---------------------------------------------------------------- full / unwritable checkpoint storage

def _digest(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(directory.rglob("*")) if f.is_file()}


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path | None]:
    """A real 64 MiB tmpfs (None when this process may not mount: the tests fall back)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_checkpoint_disk_is_a_clear_error_and_keeps_the_last_checkpoint(
        ray_session: object, tiny_attrworld: Path, tmp_path: Path, small_disk: Path | None,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = (small_disk or tmp_path) / "run"
    assert train(tiny_attrworld, run, "--workers", "2", "--max-steps", "2") == 0
    (last,) = find_checkpoints(run)
    before, size = _digest(last), dir_bytes(last)
    extra: list[str] = []
    if small_disk is not None:  # fill the disk until half a checkpoint is left
        ballast = small_disk / "ballast"
        with open(ballast, "wb") as f:
            f.truncate(0)
            f.write(b"\1" * (shutil.disk_usage(small_disk).free - size // 2))
    else:  # no mount rights: demand more headroom than the disk has
        extra = ["--set", f"checkpoint.min_free_mb={shutil.disk_usage(tmp_path).free / 2**20:.0f}"]
    free = shutil.disk_usage(run).free
    capsys.readouterr()
    code = train(tiny_attrworld, run, "--workers", "2", "--max-steps", "4", "--set", "checkpoint.max_failures=0", *extra)
    err = capsys.readouterr().err.strip()
    # stderr also carries progress lines; the error is one line, the last
    assert code == 2 and [x for x in err.splitlines() if "error" in x] == [err.splitlines()[-1]]
    err = err.splitlines()[-1]
    figure(f"[full disk] {free / 2**20:.1f} MiB free for a {size / 2**20:.1f} MiB checkpoint "
          f"({'tmpfs' if small_disk else 'min_free_mb'}): exit {code}: {err}")
    assert "MiB free, the step 4 checkpoint needs" in err and "previous checkpoint (step 2" in err
    assert [read_state(c)["step"] for c in find_checkpoints(run)] == [2] and _digest(last) == before
    if small_disk is not None:  # space freed: the same command finishes the run
        ballast.unlink()
        assert train(tiny_attrworld, run, "--workers", "2", "--max-steps", "4") == 0
        assert read_state(find_checkpoints(run)[-1])["step"] == 4


def test_unwritable_run_directory_is_a_clear_error_and_keeps_the_last_checkpoint(
        tiny_attrworld: Path, tmp_path: Path, small_disk: Path | None, capsys: pytest.CaptureFixture[str]) -> None:
    run = (small_disk or tmp_path) / "run"
    assert train(tiny_attrworld, run, "--local", "--max-steps", "2") == 0
    (last,) = find_checkpoints(run)
    before = _digest(run)
    if small_disk is not None:
        assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    elif os.geteuid() != 0:
        for d in (run, *[p for p in run.rglob("*") if p.is_dir()]):
            d.chmod(0o555)
    else:
        pytest.skip("root without mount rights: no way to make a directory unwritable here")
    capsys.readouterr()
    code = train(tiny_attrworld, run, "--local", "--max-steps", "4")
    err = capsys.readouterr().err.strip()
    figure(f"[unwritable run dir] exit {code}: {err}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot write there" in err and "previous checkpoint (step 2" in err
    assert _digest(run) == before and [read_state(c)["step"] for c in find_checkpoints(run)] == [2]
