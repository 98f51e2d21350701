"""The serving step of `attrlab demo`: deploy the demo's runs on a local Ray Serve, send one
sample request per route over HTTP, print the answers, shut down.

The config it deploys is written to OUT/serve.yaml (Ray Serve's format): `attrlab serve --config
OUT/serve.yaml` serves the same models until Ctrl-C.
"""
from __future__ import annotations

import base64
import tarfile
import time
from pathlib import Path
from typing import Any

import requests

from cluster.connect import free_port


def _sample(shards: Path, split: str) -> tuple[str, str]:
    """(key, base64 image) of the first image of a split's first shard."""
    with tarfile.open(sorted(shards.glob(f"{split}-*.tar"))[0]) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".jpeg", ".webp")))
        return m.name.split(".")[0], base64.b64encode(tar.extractfile(m).read()).decode()


def serve_demo(out: Path, runs: dict[str, Path], shards: dict[str, Path]) -> dict[str, str]:
    """Deploy, call every route once, shut Serve down; returns model -> 'POST route -> status, ms'."""
    from ray import serve

    from cluster.connect import connect
    from serve.cli import deploy, load_config
    from serve.config import write_config

    models = {name: {"run": str(runs[name].resolve())} for name in
              ("stn_ranker", "coop_embed", "deml", "latent_retrieval", "trip")}
    port = free_port()
    cfg = write_config(out / "serve.yaml", models, port, cpus=0.25)
    print(f"[serve] deploying {len(models)} models on http://127.0.0.1:{port} ({cfg}) ...")
    started = connect(num_cpus=4)  # the demo's cluster when it has one
    answered: dict[str, str] = {}

    def post(model: str, path: str, label: str, body: dict[str, Any]) -> requests.Response:
        t0 = time.perf_counter()
        r = requests.post(url + path, json=body, timeout=120)
        ms = (time.perf_counter() - t0) * 1000
        answered.setdefault(model, f"POST {path} -> {r.status_code}, {ms:.0f} ms")
        shown = _short(r.json()) if r.headers.get("content-type", "").startswith("application/json") else \
            f"{r.headers.get('content-type')} {len(r.content)} bytes"
        print(f"  POST {path:34s} {label}\n    -> {r.status_code} in {ms:.0f} ms: {shown}")
        return r

    try:
        deploy(load_config(cfg), 300)
        url = f"http://127.0.0.1:{port}"
        infos = {m["name"]: m for m in requests.get(f"{url}/v1/models", timeout=60).json()["models"]}
        for name, m in infos.items():
            print(f"  {name:17s} {m['method']:17s} {m['version']:45s} index {m['index_size']:>5d}  {m['routes']}")
        face_key, face = _sample(shards["faces"], "gallery")
        key, img = _sample(shards["attrworld"], "test")
        gkey, gimg = _sample(shards["attrworld"], "gallery")
        dkey, digit = _sample(shards["digits"], "test")
        attrs = infos["latent_retrieval"]["attributes"]
        post("stn_ranker", "/v1/rank/stn_ranker", f"rank {key}", {"image": img})
        post("stn_ranker", "/v1/rank/stn_ranker/compare", f"compare {key} vs {gkey}", {"pairs": [[img, gimg]]})
        post("coop_embed", "/v1/search/coop_embed", f"search coop_embed {gkey}", {"image": gimg, "k": 3})
        post("deml", "/v1/search/deml", f"search deml {dkey}", {"image": digit, "k": 3})
        post("latent_retrieval", "/v1/search/latent_retrieval", f"face search {face_key}, more {attrs[0]}",
             {"image": face, "k": 3, "adjust": {attrs[0]: 1.0}, "prefer": {attrs[0]: 2.0}})
        v = [1.0] * len(infos["trip"]["attributes"])
        r = post("trip", "/v1/translate/trip", f"{face_key}, v={v}, 5 steps", {"image": face, "v": v, "steps": 5})
        png = out / "serve_translate_strip.png"
        png.write_bytes(r.content)
        print(f"    saved to {png}")
        bad = requests.post(f"{url}/v1/translate/trip", json={"image": face, "v": [3.0] * len(v)}, timeout=60)
        print(f"  a bad request (v out of range)     -> {bad.status_code} {bad.json()['error']}")
    finally:
        serve.shutdown()
        if started:
            import ray

            ray.shutdown()
    print(f"[serve] shut down; serve the same models with: attrlab serve --config {cfg}")
    return answered


def _short(obj: Any) -> str:
    """An answer on one line: floats rounded, long lists cut."""
    def walk(x: Any) -> Any:
        if isinstance(x, float):
            return round(x, 3)
        if isinstance(x, list):
            return [walk(v) for v in x[:3]] + (["..."] if len(x) > 3 else [])
        if isinstance(x, dict):
            return {k: walk(v) for k, v in list(x.items())[:6]}
        return x
    text = str(walk(obj))
    return text if len(text) < 400 else text[:400] + " ..."
