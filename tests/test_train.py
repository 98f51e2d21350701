"""The training platform end to end on tiny shards: Ray Train with 2 CPU workers and DeepSpeed
(gloo), resume, --local, eval and report (faults survived: tests/test_faults.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.checkpoints import STAGING, sweep_orphan_staging, find_checkpoints, read_state
from jobs.cli import main

SMALL = ["--set", "data.augment.resize=32", "--set", "data.augment.size=28", "--set", "data.loader.batch_size=6",
         "--set", "data.loader.num_workers=0", "--set", "model.stage1_steps=2", "--set", "schedule.log_every=1",
         "--set", "checkpoint.every_steps=2", "--set", "eval.every_steps=2", "--set", "scaling.cpus_per_worker=0.5",
         "--set", "model.tta_crops=1"]


def steps_logged(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss/main" in r]


def train(data: Path, run: Path, *extra: str) -> int:
    return main(["train", "stn_ranker", "--data", str(data), "--out", str(run), *SMALL, *extra])


@pytest.mark.slow
def test_ray_train_two_workers_deepspeed_then_resume(ray_session: object, tiny_attrworld: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(tiny_attrworld, run, "--workers", "2", "--max-steps", "4") == 0
    ckpts = find_checkpoints(run)
    assert [read_state(c)["step"] for c in ckpts] == [2, 4]
    last = ckpts[-1]
    assert (last / "ds_main").is_dir() and (last / "export" / "model.safetensors").is_file()
    assert read_state(last)["metrics"]["val/rank_acc"] >= 0
    saved = json.loads((run / "run.json").read_text())
    assert saved["method"] == "stn_ranker" and len(saved["manifest_checksum"]) == 16
    # the same run directory with a larger budget resumes at step 4: no step is trained twice
    assert train(tiny_attrworld, run, "--workers", "2", "--max-steps", "6") == 0
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert read_state(find_checkpoints(run)[-1])["step"] == 6


def test_local_loop_eval_and_report(tiny_attrworld: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "local"
    assert train(tiny_attrworld, run, "--local", "--max-steps", "4") == 0
    assert steps_logged(run) == [1, 2, 3, 4]
    assert main(["eval", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    attrs = ["smile", "eye_open", "brow_thick", "hair_dark", "beard", "nose_size", "face_width"]
    assert {"rank_acc", "stn_hit", "step", "manifest_checksum"} <= set(metrics)
    assert all(f"rank_acc/{a}" in metrics for a in attrs) and metrics["step"] == 4
    assert 0 <= metrics["rank_acc"] <= 1 and 0 <= metrics["stn_hit"] <= 1
    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "rank_acc" in page and "curve_losses.png" in page
    assert (run / "report" / "curve_losses.png").stat().st_size > 1000
    # a different config in the same run directory is refused, nothing is overwritten
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert train(tiny_attrworld, run, "--local", "--max-steps", "4", "--set", "optim.lr=0.5") == 2
    assert "resuming a run with a different config (optim.lr" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before


def test_train_cli_errors_are_one_line(tiny_attrworld: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        (["train", "nope", "--data", str(tiny_attrworld), "--out", str(tmp_path / "a")], "unknown method 'nope'"),
        (["train", "stn_ranker", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--local"], "meta.json: missing"),
        (["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(tmp_path / "c"), "--set", "optim.lr=x"],
         "optim.lr: expected a number"),
        (["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(tmp_path / "d"), "--local",
          "--set", "model.attributes=[smiles]"], "'smiles' is not an attribute"),
        (["eval", str(tmp_path / "none")], "no such run directory"),
        (["eval", str(tmp_path)], "no finished checkpoint"),
        (["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(tmp_path / "e"), "--config",
          str(tmp_path / "nope.yaml")], "nope.yaml: no such file"),
        (["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(tmp_path / "f"), "--local",
          "--set", "deepspeed.config_file=cluster/deepspeed/nope.json"], "deepspeed.config_file cluster/deepspeed/nope.json: not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_staging_left_by_a_killed_worker_is_swept_and_live_ones_are_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dirs = {name: tmp_path / f"{STAGING}{pid}-4-abc_{name}" for name, pid in
                (("dead", dead.pid), ("live", live.pid), ("self", os.getpid()))}
        for d in dirs.values():
            (d / "ds_main").mkdir(parents=True)
            (d / "ds_main" / "model.pt").write_bytes(b"x" * 100)
        other = tmp_path / "someone-elses-dir"
        other.mkdir()
        assert sweep_orphan_staging(tmp_path) == [dirs["dead"]]
        assert not dirs["dead"].exists()
        assert dirs["live"].is_dir() and dirs["self"].is_dir() and other.is_dir()
    finally:
        live.kill()
        live.wait()
