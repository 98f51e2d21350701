"""Smoke runs of `attrlab bench data | serve | gpu` on tiny sizes: every row well formed; the files
and shards pipelines read the same samples; drive() counts the answers that are not 200; rows
from a recorded Serve measurement carry their verdicts; the GPU helpers (FLOP counting, MFU, the
step and loop measurements) run on the CPU with Ray unimportable."""
from __future__ import annotations

import http.server
import itertools
import math
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import requests
import torch

from bench import data_bench, gpu_bench, serve_bench, serve_figures, shard_read
from bench.cli import Context

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Context, list]:
    ctx = Context(smoke=True, work=tmp_path_factory.mktemp("bench"), runs=Path("no-runs"))
    return ctx, data_bench.run(ctx)


def test_data_smoke_rows_are_well_formed(data_rows: tuple[Context, list]) -> None:
    _, rows = data_rows
    ids = {r.id for r in rows}
    assert {"data/shards_vs_files", "data/shards_vs_files_warm", "data/shards_per_core", "data/shards_vs_wds",
            "data/loader_vs_step_stn_ranker", "data/loader_vs_step_coop_embed", "data/loader_vs_step_deml"} == ids
    for r in rows:
        r.check()
        assert r.ours > 0 and (r.baseline is None or r.baseline > 0) and r.what and r.unit
        assert r.met is None or r.met == (r.ratio >= float(r.goal.split()[-1]) if r.ratio is not None
                                          else r.ours >= float(r.goal.split()[-1]))
        if r.met is False:
            assert r.note  # a missed goal says what limits it


def _labels(samples: Iterator[dict]) -> Counter:
    return Counter((s["instance"], s["category"], tuple(round(float(v), 4) if not math.isnan(v) else None
                                                      for v in s["attributes"].tolist()), tuple(s["image"].shape))
                   for s in samples)


def test_files_and_shards_pipelines_read_the_same_samples(data_rows: tuple[Context, list]) -> None:
    """The comparison is fair only if both pipelines deliver the same split, decoded the same way."""
    from shards.reader import LoaderConfig, ShardStream

    ctx, _ = data_rows
    root = ctx.work / "attrworld"
    files = shard_read.file_list(root)
    every = ShardStream(root, "train", mode="eval", augment=shard_read.AUG, rank=0, world_size=1,
                        cfg=LoaderConfig(batch_size=1, num_workers=0))
    from_shards = _labels(iter(every))
    assert sum(from_shards.values()) == len(files) == every.count > 0
    assert _labels(shard_read.run_files(root, len(files))) == from_shards
    trained = list(shard_read.run_shards(root, 50))  # train mode: shard cycling + shuffle buffer
    assert len(trained) == 50 and set(_labels(trained)) <= set(from_shards)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        code = 200 if self.path == "/ok" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_drive_counts_the_answers_that_are_not_200() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    counter, lock = itertools.count(), threading.Lock()

    def send(s: requests.Session) -> int:
        with lock:
            i = next(counter)
        return s.post(url + ("/missing" if i % 3 == 0 else "/ok"), data="{}", timeout=10).status_code

    try:
        r = serve_bench.drive(send, 60, 4, pids={"server": [os.getpid()]})
    finally:
        server.shutdown()
    assert r["errors"] == 20 and r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    # the server runs in this process: /proc/<pid>/stat and os.times() account the same CPU, to a clock tick
    cpu = r["cpu_ms"]
    assert set(cpu) == {"server", "client"} and cpu["client"] > 0
    assert cpu["server"] == pytest.approx(cpu["client"], abs=2 * 1000 / os.sysconf("SC_CLK_TCK") / 60)


def _recorded(rps_on: float, rps_off: float, errors: int = 0) -> dict:
    lvl = {"p50_ms": 25.0, "p99_ms": 40.0, "rps": 40.0, "errors": 0}
    return {"rank|batch=16|c=1": {**lvl, "p50_ms": 30.0}, "rank|batch=1|c=1": lvl,
            "rank|batch=16|c=32": {**lvl, "rps": rps_on, "errors": errors}, "rank|batch=1|c=32": {**lvl, "rps": rps_off}}


def test_serve_rows_from_a_recorded_measurement() -> None:
    rows = {r.id: r for r in serve_figures.figures(_recorded(12.0, 10.0), {"rank": 85.0}, ("rank",))}
    assert set(rows) == {"serve/batching_c32_rank", "serve/latency_rank", "serve/overhead_rank"}
    for r in rows.values():
        r.check()
    b = rows["serve/batching_c32_rank"]
    assert b.ratio == pytest.approx(1.2) and b.met is False and "compute-bound" in b.note
    assert rows["serve/latency_rank"].ours == 30.0 and "p99 40.0" in rows["serve/latency_rank"].note
    o = rows["serve/overhead_rank"]
    assert o.ours == 25.0 and o.baseline == 85.0 and o.ratio == pytest.approx(85 / 25)
    ok = {r.id: r for r in serve_figures.figures(_recorded(40.0, 10.0), {"rank": 2.0}, ("rank",))}
    assert ok["serve/batching_c32_rank"].met is True and ok["serve/batching_c32_rank"].note == ""
    bad = {r.id: r for r in serve_figures.figures(_recorded(40.0, 10.0, errors=3), {"rank": 2.0}, ("rank",))}
    assert bad["serve/batching_c32_rank"].met is False and "3 requests failed" in bad["serve/batching_c32_rank"].note


def test_serve_limit_note_from_the_cpu_per_request() -> None:
    rec = _recorded(12.0, 10.0)
    rec["rank|batch=16|c=32"]["cpu_ms"] = {"proxy": 4.0, "gateway": 6.0, "model": 3.0, "client": 1.0}
    rec["rank|batch=1|c=32"]["cpu_ms"] = {"proxy": 4.0, "gateway": 6.0, "model": 5.0, "client": 1.0}
    note = {r.id: r for r in serve_figures.figures(rec, {"rank": 2.0}, ("rank",))}["serve/batching_c32_rank"].note
    cores = os.cpu_count() or 1
    assert "= 14.0 ms (off: 16.0 ms, model replica 5.0)" in note
    assert f"caps throughput at {cores * 1000 / 14:.0f} req/s" in note and "cost 10.0 ms per request" in note
    assert "compute-bound" not in note  # the model replica is 3 of 14 ms
    rec["rank|batch=16|c=32"]["cpu_ms"]["model"] = 20.0
    note = {r.id: r for r in serve_figures.figures(rec, {"rank": 2.0}, ("rank",))}["serve/batching_c32_rank"].note
    assert "compute-bound" in note


def test_serve_without_runs_tells_to_run_make_demo(tmp_path: Path) -> None:
    from shards.format import ShardError

    with pytest.raises(ShardError, match="make demo"):
        serve_figures.served_runs(Context(smoke=False, work=tmp_path, runs=tmp_path / "runs"))


@pytest.mark.slow
def test_serve_smoke_deploys_a_tiny_run(ray_session: object, tiny_attrworld: Path,
                                        tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.test_serve import trained_runs

    runs = trained_runs(tiny_attrworld, tmp_path_factory, ("stn_ranker",))
    rows = serve_figures.run(Context(smoke=True, work=tmp_path_factory.mktemp("bench-serve"),
                                     runs=runs["stn_ranker"].parent))
    assert {r.id for r in rows} == {f"serve/{k}_{r}" for k in ("batching_c32", "latency", "overhead")
                                    for r in ("rank", "compare")}
    for r in rows:
        r.check()
        assert "failed" not in r.note and r.ours > 0
        if r.id.startswith("serve/batching") and not r.met:  # Serve's local processes were found and accounted
            assert "CPU per request at full load, batching on: proxy" in r.note, r.note


def test_gpu_arithmetic_and_flop_counting() -> None:
    assert gpu_bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_bench.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_bench.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu_bench.peak_bf16_flops("Tesla T4") is None
    assert gpu_bench.mfu(989e12 * 0.01 * 0.4, 0.01, 989e12) == pytest.approx(0.4)
    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.randn(16, 8, requires_grad=True)
    # forward 2*16*8*4; backward: the input's and the weight's gradients, as much again each
    assert gpu_bench.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * 16 * 8 * 4
    if not torch.cuda.is_available():
        assert gpu_bench.run(Context(smoke=True, work=Path("unused"), runs=Path("unused"))) == []


def test_gpu_rows_from_recorded_measurements() -> None:
    alone = {"coop_embed": {"flops": 4e12, "s_per_step": {"eager": 0.02, "channels_last": 0.016}, "batch": 128,
                            "samples_per_s": {"eager": 6400.0, "channels_last": 8000.0}, "loader_per_s": 9000.0,
                            "loader_workers": 4}}
    rows = {r.id: r for r in gpu_bench.gpu_rows("NVIDIA H100 80GB HBM3", {"coop_embed": 5000.0, "trip": 30.0}, alone,
                                                (0.4, "eager", 256))}
    assert set(rows) == {"gpu/train_coop_embed", "gpu/train_trip", "gpu/mfu_resnet50", "gpu/stn_infer"}
    for r in rows.values():
        r.check()
    m = rows["gpu/mfu_resnet50"]
    assert m.ours == pytest.approx(100 * 4e12 / 0.016 / 989e12) and m.met is False and "channels_last" in m.note
    assert rows["gpu/train_coop_embed"].ratio == pytest.approx(5000 / 6400) and rows["gpu/train_trip"].baseline is None
    assert rows["gpu/stn_infer"].met is True
    assert "gpu/mfu_resnet50" not in {r.id for r in gpu_bench.gpu_rows("Tesla T4", {}, alone, None)}


CPU_GPU_PATH = """
import sys
# what the lent GPU machine lacks (bench/gpu_kit.sh carries DeepSpeed and faiss): importing fails
for absent in ("ray", "mlflow", "fastapi", "starlette", "webdataset"):
    sys.modules[absent] = None
import time
from pathlib import Path
import torch
from bench import gpu_bench
from jobs.cli_train import CONFIG_DIR
data, work = Path(sys.argv[1]), Path(sys.argv[2])
small = ["deepspeed.enabled=false", "data.augment.resize=32", "data.augment.size=28", "data.loader.batch_size=6",
         "data.loader.num_workers=0", "model.tta_crops=1", "model.stage1_steps=1"]
a = gpu_bench.step_bench("stn_ranker", data, torch.device("cpu"), config=None, sets=small, steps=2, warmup=1,
                         variants=("eager", "channels_last"))
assert a["flops"] > 0 and set(a["s_per_step"]) == {"eager", "channels_last"}, a
assert a["batch"] == 6 and a["samples_per_s"]["eager"] == 6 / a["s_per_step"]["eager"]
late = gpu_bench.step_bench("stn_ranker", data, torch.device("cpu"), config=None, sets=small, steps=1, warmup=0,
                            variants=("eager", "channels_last"), deadline=time.monotonic() - 1)
assert set(late["s_per_step"]) == {"eager"}, late  # past ATTRLAB_GPU_BUDGET_S: only the eager step
ms, note, batch = gpu_bench.stn_inference(torch.device("cpu"), data, 2, 1, config=CONFIG_DIR / "stn_ranker.yaml",
                                          sets=("data.augment.resize=32", "data.augment.size=28", "model.tta_crops=10"))
assert ms > 0 and batch == 2 and "1 crop" in note
rate = gpu_bench.loop_rate("stn_ranker", data, work / "run", 4, 1, config=None,
                           sets=[*small, "eval.every_steps=100"])
assert rate > 0
assert not any(m.split(".")[0] in ("ray", "mlflow", "fastapi") for m in sys.modules if sys.modules[m] is not None)
print("ok", a["flops"], rate)
"""


def test_gpu_step_and_loop_measurements_run_on_cpu_without_ray_or_mlflow(data_rows: tuple[Context, list],
                                                                          tmp_path: Path) -> None:
    ctx, _ = data_rows
    # a process group of one set up by an earlier in-process run leaves MASTER_PORT (bound by this
    # process) in the environment: the child picks its own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(ATTRLAB_TRACKING="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", CPU_GPU_PATH, str(ctx.work / "attrworld"), str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
