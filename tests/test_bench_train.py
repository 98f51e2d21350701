"""`attrlab bench train` and `attrlab bench methods` in smoke mode on the session's 2-node Ray cluster:
every figure comes back as a well-formed row, and the numbers behind them are what they claim —
the in-process and Ray runs compared by train/ray_overhead compute the same steps, and the
samples/s read from train_log.jsonl equals the samples counted going into the model over the
time measured around the log calls."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from bench import method_bench, train_bench
from bench.cli import Context


def _ctx(tmp: Path, data: Path) -> Context:
    (tmp / "shards").mkdir(parents=True)
    os.symlink(data, tmp / "shards" / "attrworld")  # the smoke build is the session's tiny attrworld
    return Context(smoke=True, work=tmp, runs=tmp / "no-demo-runs")


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/main"] for r in train_bench.log_rows(run)}


@pytest.mark.slow  # 3 TorchTrainer start-ups (~10-15 s each here) + DeepSpeed's per-process init
def test_train_figures_smoke_rows_and_what_they_measure(ray_cluster: Any, tiny_attrworld: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.checkpoints import LocalReporter
    from models import registry

    # independent witnesses of the in-process run: the samples entering the model per step, and
    # the clock around every log call
    fed: list[int] = []
    logged: list[tuple[float, float, dict[str, Any]]] = []
    get, log = registry.get, LocalReporter.log

    def counting_get(name: str) -> registry.Method:
        m = get(name)
        if name != "stn_ranker":
            return m

        def step(model: Any, batch: dict[str, Any], cfg: Any, info: Any) -> Any:
            fed.append(int(batch["label"].shape[0]))
            return m.step(model, batch, cfg, info)
        return dataclasses.replace(m, step=step)

    def timed_log(self: LocalReporter, row: dict[str, Any]) -> None:
        t_in = time.perf_counter()
        log(self, row)
        logged.append((t_in, time.perf_counter(), row))

    monkeypatch.setattr(registry, "get", counting_get)
    monkeypatch.setattr(LocalReporter, "log", timed_log)
    ctx = _ctx(tmp_path, tiny_attrworld)
    rows = train_bench.run(ctx)
    assert [r.id for r in rows] == ["train/ray_overhead", "train/scaling_2workers", "train/deepspeed_vs_ddp"]
    for r in rows:
        r.check()
        assert r.ours > 0 and r.baseline and r.baseline > 0 and r.ratio and r.ratio > 0 and r.note
    assert rows[0].goal == ">= 0.95" and rows[1].goal == ">= 0.8" and rows[2].goal == "" and rows[2].unit == "ms/step"
    assert "STRICT_SPREAD" in rows[1].what  # the session cluster has 2 nodes: one worker per node

    # train/ray_overhead compares the same computation: same seed, data order and steps in both runs
    work = tmp_path / "train"
    local, ray1 = _losses(work / "local"), _losses(work / "ray_1worker")
    assert sorted(local) == sorted(ray1) == [1, 2, 3, 4]
    for s in local:
        assert ray1[s] == pytest.approx(local[s], rel=1e-4), (s, local, ray1)
    # the 2-worker runs trained every step too, with finite losses
    for name in ("ray_2workers_ds", "ray_2workers_plain"):
        assert sorted(_losses(work / name)) == [1, 2, 3, 4]
    workers = [json.loads(x) for x in (work / "ray_2workers_ds" / "workers.jsonl").read_text().splitlines()]
    assert len({r["node_id"] for r in workers[-1]["ranks"]}) == 2, "STRICT_SPREAD: one worker per Ray node"

    # samples/s as logged == samples counted into the model / seconds between log calls
    train_rows = [(a, b, r) for a, b, r in logged if "samples_per_s" in r]
    assert [r["step"] for _, _, r in train_rows] == [1, 2, 3, 4]  # the in-process run only (log_every=1)
    per_step = fed[-4:]  # the local run's 4 steps (check_build does not step)
    samples, seconds = 0, 0.0
    for i in range(1, 4):  # window i: from the end of log call i-1 to the start of log call i
        dt = train_rows[i][0] - train_rows[i - 1][1]
        assert train_rows[i][2]["samples_per_s"] == pytest.approx(per_step[i] / dt, rel=0.03)
        if i >= 2:  # the bench's window: steps 3-4
            samples, seconds = samples + per_step[i], seconds + dt
    rate, n = train_bench.steady_rate(work / "local", train_bench.WARMUP_ROWS * 1)
    assert n == 2 and rate == pytest.approx(samples / seconds, rel=0.03)
    assert rows[0].baseline == pytest.approx(rate)


def test_method_figures_smoke_rows(tiny_attrworld: Path, tmp_path: Path) -> None:
    rows = method_bench.run(_ctx(tmp_path, tiny_attrworld))
    ids = [r.id for r in rows]
    assert ids == [f"methods/{kind}_{m}" for m in method_bench.METHODS for kind in ("train", "infer")]
    for r in rows:
        r.check()
        assert r.ours > 0 and r.goal == "" and r.met is None and r.machine and r.note
    for r in rows[1::2]:
        assert r.unit == "ms/image" and r.baseline and r.baseline > 0 and r.ratio == pytest.approx(r.ours / r.baseline)
        assert str(tmp_path / "methods") in r.note  # no demo runs here: served from the runs trained above
