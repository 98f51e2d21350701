"""`attrlab bench serve`: Ray Serve's speed figures, per route, from a deployment of make demo's runs.

  serve/batching_c32_ROUTE  req/s at concurrency 32 with batching on (max_batch_size 16) vs off (1);
                            goal >= 3x
  serve/latency_ROUTE       p50 ms at concurrency 1 as served (batching on); p99 and c=32 in the note
  serve/overhead_ROUTE      Serve's p50 at concurrency 1 (batching off: no batch wait) vs the same
                            service called in this process; ratio = in-process / Serve

Routes and the measurement are bench/serve_bench.py's (deploy, drive, in_process): one-image
requests (64 px PNG, base64 JSON) from N client threads over loopback HTTP, one replica per model.
Needs make demo's runs (--runs, default data/runs). --smoke: the stn_ranker routes only, a few
requests each, from a tiny run it trains itself when --runs has none.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bench.core import Row, row, torch_threads
from shards.format import ShardError

SMOKE_ROUTES = ("rank", "compare")
CONCURRENCY = 32


def slug(route: str) -> str:
    return route.replace(" ", "_")


def run(ctx: Any) -> list[Row]:
    import ray

    from bench import serve_bench

    runs, routes = served_runs(ctx)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    c = 4 if ctx.smoke else CONCURRENCY
    with torch_threads(1):  # as a replica: Ray gives an actor of 0.5 CPU OMP_NUM_THREADS=1
        inproc = serve_bench.in_process(runs, image, 3 if ctx.smoke else 50, routes)
    started = not ray.is_initialized()  # measure() starts a local Ray of 4 CPUs when none is running
    try:
        results = serve_bench.measure(runs, image, routes, (1, c), 8 if ctx.smoke else 200,
                                      warmup=2 if ctx.smoke else 10,
                                      log=lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    return figures(results, inproc, routes, c)


def served_runs(ctx: Any) -> tuple[dict[str, Path], tuple[str, ...]]:
    """(method -> run directory, routes to measure). Full: every route whose model make demo
    trained under ctx.runs (none at all is an error telling to run make demo). Smoke: the stn_ranker
    routes, from ctx.runs or a tiny run trained under ctx.work."""
    from bench.serve_bench import ROUTES

    runs = Path(ctx.runs)
    have = {m for m in {v[0] for v in ROUTES.values()} if (runs / m / "config.yaml").is_file()}
    if ctx.smoke:
        stn = runs / "stn_ranker" if "stn_ranker" in have else tiny_stn_run(Path(ctx.work) / "serve")
        return {"stn_ranker": stn}, SMOKE_ROUTES
    routes = tuple(r for r, (m, _, _) in ROUTES.items() if m in have)
    if not routes:
        raise ShardError(f"--runs {runs}: no trained runs of {sorted({v[0] for v in ROUTES.values()})}; "
                         "run `make demo` first (it trains and indexes them under data/runs), or pass --runs DIR")
    missing = sorted({ROUTES[r][0] for r in ROUTES} - have)
    if missing:
        print(f"attrlab bench serve: no runs of {missing} under {runs} (make demo trains them); "
              f"measuring {list(routes)}", file=sys.stderr)
    return {m: runs / m for m in have}, routes


# the tests' tiny stn_ranker run (tests/test_train.py SMALL): 32 px, 2 steps, in this process
TINY_STN = ["data.augment.resize=32", "data.augment.size=28", "data.loader.batch_size=6", "data.loader.num_workers=0",
            "model.stage1_steps=2", "schedule.log_every=1", "checkpoint.every_steps=2", "eval.every_steps=2",
            "model.tta_crops=1", "deepspeed.enabled=false", "tracking.enabled=false"]


def tiny_stn_run(work: Path) -> Path:
    from jobs.cli import main
    from shards.datasets import BuildOptions, plan_embedded
    from shards.writer import write_dataset

    out, ready = work / "runs" / "stn_ranker", work / "runs" / "stn_ranker.ready"
    if ready.exists():
        return out
    data = work / "attrworld32"
    plan = plan_embedded("attrworld", BuildOptions(seed=0, size=32, count=96, options={
        "images_per_identity": "8", "pairs_per_attribute": "200", "clutter": "4"}))
    write_dataset(plan, data, shard_size=16, workers=1, progress=False, overwrite=True)
    if out.exists():  # an interrupted earlier attempt
        import shutil

        shutil.rmtree(out)
    if main(["train", "stn_ranker", "--data", str(data), "--out", str(out), "--local", "--max-steps", "2",
             *(x for s in TINY_STN for x in ("--set", s))]) != 0:
        raise RuntimeError("training the tiny stn_ranker run for the serve smoke failed")
    ready.touch()
    return out


def _limits(route: str, on: Mapping[str, Any], off: Mapping[str, Any], serve1: float, inproc: float) -> str:
    """What keeps batching from 3x on this machine, with this run's numbers: where each request's CPU
    went at full load (serve_bench.drive's per-process accounting), else the latency difference."""
    cores = os.cpu_count() or 1
    cpu_on, cpu_off = on.get("cpu_ms") or {}, off.get("cpu_ms") or {}
    if cpu_on and cpu_off:
        total_on, total_off = sum(cpu_on.values()), sum(cpu_off.values())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in cpu_on.items())
        text = (f"CPU per request at full load, batching on: {parts} = {total_on:.1f} ms (off: {total_off:.1f} ms, "
                f"model replica {cpu_off.get('model', 0.0):.1f}); on {cores} cores that caps throughput at "
                f"{cores * 1000 / total_on:.0f} req/s (measured {on['rps']:.0f}). Batching only shrinks the model "
                f"replica's share (in-process model call {inproc:.1f} ms at batch 1); the HTTP proxy, the FastAPI "
                f"gateway and the actor hops cost {cpu_on.get('proxy', 0.0) + cpu_on.get('gateway', 0.0):.1f} ms "
                "per request whatever the batch")
        compute_bound = cpu_on.get("model", 0.0) > total_on / 2
    else:  # processes not visible (a remote cluster): the latency difference at concurrency 1
        fixed = max(serve1 - inproc, 0.0)
        text = (f"Serve's fixed cost per request (HTTP proxy, FastAPI gateway, two actor hops) is {fixed:.1f} ms "
                f"here against {inproc:.1f} ms of model time, and it does not batch; throughput saturates at "
                f"{max(on['rps'], off['rps']):.0f} req/s")
        compute_bound = inproc > fixed
    if compute_bound:
        text += (f"; the model is compute-bound on CPU ({inproc:.1f} ms per image in-process): a batch costs "
                 "nearly as many single calls (methods/infer_* measures this CPU's per-image gain from batch 32), "
                 "so batching cannot reach 3x here (on a GPU a batch costs about one call)")
    return text


def figures(results: Mapping[str, Mapping[str, Any]], inproc: Mapping[str, float], routes: tuple[str, ...],
            c: int = CONCURRENCY) -> list[Row]:
    """Rows from serve_bench.measure()'s results (batch 16 and 1 at concurrency 1 and c) and
    in_process()'s p50s. A level that had failed requests makes its rows' verdict not met."""
    rows = []
    for route in routes:
        on1, off1 = results[f"{route}|batch=16|c=1"], results[f"{route}|batch=1|c=1"]
        on, off = results[f"{route}|batch=16|c={c}"], results[f"{route}|batch=1|c={c}"]
        failed = sum(int(r["errors"]) for r in (on1, off1, on, off))
        bad = f"{failed} requests failed: the figures are not valid. " if failed else ""
        ratio = on["rps"] / off["rps"]
        met = ratio >= 3 and not failed
        s = slug(route)
        rows.append(row(
            f"serve/batching_c32_{s}", f"{route}: req/s at concurrency {c} (one-image requests over loopback HTTP), "
            "batching on (max_batch_size 16, 5 ms wait) vs off (max_batch_size 1)", on["rps"], "req/s",
            baseline=off["rps"], baseline_label="batching off", ratio=ratio, goal=">= 3", met=met,
            note=bad + ("" if met else _limits(route, on, off, off1["p50_ms"], inproc[route]))))
        rows.append(row(
            f"serve/latency_{s}", f"{route}: p50 latency at concurrency 1, batching on (as served)", on1["p50_ms"], "ms",
            note=bad + f"p99 {on1['p99_ms']:.1f} ms; at concurrency {c}: p50 {on['p50_ms']:.1f}, p99 {on['p99_ms']:.1f} ms "
                 f"(batching off: {off['p50_ms']:.1f} / {off['p99_ms']:.1f} ms)"))
        rows.append(row(
            f"serve/overhead_{s}", f"{route}: Serve p50 at concurrency 1 (batching off: no batch wait) vs the same "
            "service called in-process (one torch thread, no HTTP)", off1["p50_ms"], "ms",
            baseline=inproc[route], baseline_label="in-process", ratio=inproc[route] / off1["p50_ms"],
            note=bad + f"Serve adds {off1['p50_ms'] - inproc[route]:.1f} ms per request"))
    return rows
