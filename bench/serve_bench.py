"""Serving benchmark: p50 / p99 latency and throughput per route at concurrency 1, 8 and 32, with
batching on (max_batch_size 16) and off (1), and Serve's overhead against the same model called
in-process (serve/services.py, one image per call).

`attrlab bench serve` (bench/serve_figures.py) turns the same measurement (`in_process`, `measure`)
into BENCHMARKS.md rows.

    python -m bench.serve_bench --runs data/runs [--requests 200] [--concurrency 1 8 32] [--out docs/serve_bench.json]

--runs holds the run directories `make demo` trains (stn_ranker, coop_embed + index, deml + index,
latent_retrieval + preference index, trip). It starts a local Ray with 4 logical CPUs, deploys
the app (batching on, then off by a user_config update), drives each route from a thread pool of
N clients sending one-image requests (base64 JSON, the embedded dataset's image size), and prints
a markdown table.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import requests

from cluster.connect import free_port

ROUTES = {  # route -> (model name in the app, url suffix, body builder(image b64, info))
    "rank": ("stn_ranker", "/v1/rank/stn_ranker", lambda b, i: {"image": b}),
    "compare": ("stn_ranker", "/v1/rank/stn_ranker/compare", lambda b, i: {"pairs": [[b, b]]}),
    "search coop_embed": ("coop_embed", "/v1/search/coop_embed", lambda b, i: {"image": b, "k": 10}),
    "search deml": ("deml", "/v1/search/deml", lambda b, i: {"image": b, "k": 10}),
    "face search": ("latent_retrieval", "/v1/search/latent_retrieval",
                    lambda b, i: {"image": b, "k": 10, "adjust": {i["attributes"][0]: 1.0}, "prefer": {i["attributes"][0]: 2.0}}),
    "translate": ("trip", "/v1/translate/trip", lambda b, i: {"image": b, "v": [1.0] * len(i["attributes"])}),
}


# Serve's processes on this machine, by role: matched in /proc/<pid>/cmdline (Ray names an actor's
# process "ray::<class>", a replica "ray::ServeReplica:<app>:<deployment>")
ROLES = {"proxy": "ray::ProxyActor", "gateway": "ray::ServeReplica:attrlab:gateway",
         "model": "ray::ServeReplica:attrlab:model-"}


def serve_pids() -> dict[str, list[int]]:
    """role -> pids of Serve's local processes (empty lists on a remote cluster or off Linux)."""
    out: dict[str, list[int]] = {r: [] for r in ROLES}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited meanwhile, or not ours to read
            continue
        for role, tag in ROLES.items():
            if cmd.startswith(tag):
                out[role].append(int(d.name))
    return out


def cpu_seconds(pids: Mapping[str, list[int]]) -> dict[str, float]:
    """role -> CPU seconds (user + system) its processes used so far; "client" is this process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for role, ps in pids.items():
        total = 0
        for pid in ps:
            try:  # fields 14-15 of /proc/<pid>/stat (after the parenthesised name): utime, stime
                total += sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
            except OSError:
                pass
        out[role] = total / tick
    t = os.times()
    out["client"] = t.user + t.system
    return out


def drive(send: Callable[[requests.Session], int], n: int, concurrency: int,
          pids: Mapping[str, list[int]] | None = None) -> dict[str, Any]:
    """n requests from `concurrency` clients; latency percentiles (ms), throughput (req/s), the
    number of answers other than 200 (`send` returns the status code) and, given Serve's local
    pids by role, the CPU ms each role spent per request ("cpu_ms": the profile of where a
    request's cost goes; the client's own threads included)."""
    lat: list[float] = []
    c0 = cpu_seconds(pids) if pids else {}

    def client(count: int) -> int:
        errors = 0
        with requests.Session() as s:
            for _ in range(count):
                t0 = time.perf_counter()
                ok = send(s) == 200
                lat.append(time.perf_counter() - t0)
                errors += not ok
        return errors

    per = [n // concurrency + (i < n % concurrency) for i in range(concurrency)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        errors = sum(pool.map(client, per))
    wall = time.perf_counter() - t0
    a = np.array(lat) * 1000
    out: dict[str, Any] = {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                           "rps": n / wall, "errors": errors}
    if pids:
        c1 = cpu_seconds(pids)
        out["cpu_ms"] = {role: (c1[role] - c0[role]) * 1000 / n for role in c1}
    return out


def run_dirs(runs: Path | Mapping[str, Path], routes: tuple[str, ...]) -> dict[str, Path]:
    """method -> run directory of the models these routes need. runs: the directory holding one run
    per method (make demo's data/runs), or a mapping method -> run directory."""
    needed = sorted({ROUTES[r][0] for r in routes})
    if isinstance(runs, (str, Path)):
        return {m: Path(runs) / m for m in needed}
    return {m: Path(runs[m]) for m in needed}


def in_process(runs: Path | Mapping[str, Path], image: np.ndarray, n: int,
               routes: tuple[str, ...] = tuple(ROUTES)) -> dict[str, float]:
    """p50 ms of one-image calls to the services in this process (no HTTP, no Serve); runs as in run_dirs."""
    from serve.services import load_service

    svc = {m: load_service(m, run) for m, run in run_dirs(runs, routes).items()}
    calls: dict[str, Callable[[], Any]] = {}
    if "stn_ranker" in svc:
        calls["rank"] = lambda: svc["stn_ranker"].rank([image])
        calls["compare"] = lambda: svc["stn_ranker"].compare([(image, image)])
    for m in ("coop_embed", "deml"):
        if m in svc:
            calls[f"search {m}"] = lambda m=m: svc[m].search([image], 10)
    if "latent_retrieval" in svc:
        attrs = svc["latent_retrieval"].attributes()
        adjust = np.full((1, len(attrs)), np.nan)
        adjust[0, 0] = 1.0
        prefer = np.ones((1, len(attrs)))
        prefer[0, 0] = 2.0
        calls["face search"] = lambda: svc["latent_retrieval"].search(svc["latent_retrieval"].encode([image]), adjust,
                                                                       prefer, 10)
    if "trip" in svc:
        calls["translate"] = lambda: svc["trip"].translate([image], np.ones((1, len(svc["trip"].attributes())), np.float32))
    calls = {r: calls[r] for r in routes}
    out = {}
    for route, call in calls.items():
        call()  # warm-up
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        out[route] = float(np.percentile(np.array(times) * 1000, 50))
    return out


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _deployed_at(app: str) -> float | None:
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception:  # Serve not started yet
        return None
    return apps[app].last_deployed_time_s if app in apps else None


def measure(runs: Path | Mapping[str, Path], image: np.ndarray, routes: tuple[str, ...], concurrency: tuple[int, ...],
            requests_per_level: int, *, batches: tuple[int, ...] = (16, 1), warmup: int = 10, cpus: float = 0.5,
            timeout: float = 300, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Deploy the routes' models (on a running Ray, or a local one of 4 CPUs), once per max_batch_size
    in `batches` (16 = batching on, 1 = off: a user_config change, applied to the running replicas
    without a restart), drive every route at every concurrency with one-image requests (base64
    JSON), then shut Serve down; returns "route|batch=B|c=C" -> drive()'s result."""
    import ray
    from ray import serve

    from serve.cli import deploy, load_config, wait_running
    from serve.config import write_config
    from shards.format import ShardError

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    models = {m: {"run": str(run)} for m, run in run_dirs(runs, routes).items()}
    b64 = png_b64(image)
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    port = free_port()  # one HTTP port: a running Serve keeps its first http_options
    url = f"http://127.0.0.1:{port}"
    results: dict[str, dict[str, float]] = {}
    try:
        for batch in batches:
            before = _deployed_at("attrlab")
            deploy(load_config(write_config(tmp / f"serve-{batch}.yaml", models, port, max_batch_size=batch, cpus=cpus)),
                   timeout)
            deadline = time.time() + timeout
            while _deployed_at("attrlab") == before:  # deploy() saw the new config, not the old RUNNING one
                if time.time() > deadline:
                    raise ShardError(f"max_batch_size={batch}: not applied after {timeout:g} s")
                time.sleep(0.2)
            wait_running(["attrlab"], timeout)
            infos = {m["name"]: m for m in requests.get(f"{url}/v1/models", timeout=60).json()["models"]}
            pids = serve_pids()
            for route in routes:
                model, path, body = ROUTES[route]
                payload = json.dumps(body(b64, infos[model]))

                def send(s: requests.Session, path: str = path, payload: str = payload) -> int:
                    return s.post(url + path, data=payload, headers={"Content-Type": "application/json"},
                                  timeout=120).status_code

                if warmup:
                    drive(send, warmup, min(2, warmup))
                for c in concurrency:
                    r = drive(send, max(requests_per_level, 4 * c), c, pids)
                    results[f"{route}|batch={batch}|c={c}"] = r
                    log(f"{route:18s} batch={batch:2d} c={c:2d}  p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
                        f"{r['rps']:7.1f} req/s  errors {r['errors']}")
    finally:
        serve.shutdown()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--routes", nargs="+", default=list(ROUTES))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    import ray

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    results: dict[str, Any] = {"in_process_p50_ms": in_process(a.runs, image, 50, tuple(a.routes))}
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results.update(measure(a.runs, image, tuple(a.routes), tuple(a.concurrency), a.requests,
                           log=lambda line: print(line, flush=True)))
    print("\n| route | in-process p50 ms | c | batching on: p50 / p99 ms, req/s | off: p50 / p99 ms, req/s | on/off req/s |")
    print("|---|---|---|---|---|---|")
    for route in a.routes:
        for c in a.concurrency:
            on, off = results[f"{route}|batch=16|c={c}"], results[f"{route}|batch=1|c={c}"]
            print(f"| {route} | {results['in_process_p50_ms'][route]:.1f} | {c} | {on['p50_ms']:.1f} / {on['p99_ms']:.1f}, "
                  f"{on['rps']:.1f} | {off['p50_ms']:.1f} / {off['p99_ms']:.1f}, {off['rps']:.1f} | {on['rps'] / off['rps']:.2f}x |")
    if a.out:
        a.out.write_text(json.dumps(results, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
