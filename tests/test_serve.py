"""Ray Serve end to end: tiny trained runs of four methods deployed from a serve.yaml by
`attrlab serve`, answered over real HTTP — every route, batching under concurrency, a table of
malformed requests (each a 4xx naming the field, the server answering after), and a rolling
update under a trickle of requests that loses none."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from cluster.connect import free_port
from jobs.cli import main
from serve.config import SERVE_ENV
from tests.test_train import SMALL

pytestmark = pytest.mark.slow

COOP = ["--set", "data.augment.resize=32", "--set", "data.augment.size=28", "--set", "data.loader.num_workers=0",
        "--set", "data.loader.batch_size=8", "--set", "data.loader.classes_per_batch=3",
        "--set", "data.loader.images_per_class=2", "--set", "data.loader.shuffle_buffer=60",
        "--set", "schedule.warmup_steps=1", "--set", "eval.every_steps=2", "--set", "checkpoint.every_steps=2",
        "--set", "model.subspace_width=4", "--set", "deepspeed.enabled=false"]
LATENT = [x for s in ["data.loader.num_workers=0", "data.loader.batch_size=8", "model.code_dim=8", "model.ae_base=8",
                      "model.lams=[0.0]", "model.fit_iters=20", "model.queries=20", "data.test_split=train",
                      "data.val_split=train", "eval.every_steps=2", "checkpoint.every_steps=2", "model.figure_images=0"]
          for x in ("--set", s)]
TRIP = [x for s in ["data.loader.num_workers=0", "data.loader.batch_size=4", "eval.every_steps=2",
                    "checkpoint.every_steps=2", "model.pretrain_steps=1", "model.eval_images=4",
                    "model.attributes=[hair_dark,beard]", "data.val_split=train"] for x in ("--set", s)]


TRAIN_ARGS = {"stn_ranker": SMALL, "coop_embed": COOP, "latent_retrieval": LATENT, "trip": TRIP}
INDEX_ARGS = {"coop_embed": [], "latent_retrieval": ["--kind", "preference"]}


def trained_runs(data: Path, tmp_path_factory: pytest.TempPathFactory, methods: tuple[str, ...]) -> dict[str, Path]:
    """Tiny 2-step runs (+ their index) of these methods, trained once per test session: every
    Serve test module asks for the ones it needs and reuses what an earlier module trained."""
    root = tmp_path_factory.getbasetemp() / "served-runs"
    out = {m: root / m for m in methods}
    for method in methods:
        done = root / f"{method}.ready"
        if done.exists():
            continue
        assert main(["train", method, "--data", str(data), "--out", str(out[method]), "--local",
                     "--max-steps", "2", *TRAIN_ARGS[method]]) == 0
        if method in INDEX_ARGS:
            assert main(["index", str(out[method]), *INDEX_ARGS[method]]) == 0
        done.touch()
    return out


@pytest.fixture(scope="module")
def runs(tiny_attrworld: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return trained_runs(tiny_attrworld, tmp_path_factory, ("stn_ranker", "coop_embed", "latent_retrieval", "trip"))


def _config(path: Path, runs: dict[str, Path], port: int, stn_run: Path | None = None) -> Path:
    cfg = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "attrlab", "route_prefix": "/", "import_path": "serve.app:build_app",
                             "runtime_env": {"env_vars": dict(SERVE_ENV)},  # as serve.yaml
                             "args": {"models": {"stn": {"run": str(stn_run or runs["stn_ranker"])},
                                                 "coop": {"run": str(runs["coop_embed"])},
                                                 "faces": {"run": str(runs["latent_retrieval"])},
                                                 "trip": {"run": str(runs["trip"])}},
                                      "limits": {"max_images": 8, "max_k": 20, "max_image_bytes": 200_000}},
                             "deployments": [{"name": f"model-{n}", "ray_actor_options": {"num_cpus": 0.1},
                                              "user_config": {"max_batch_size": 16, "batch_wait_timeout_s": 0.05}}
                                             for n in ("stn", "coop", "faces", "trip")]
                             + [{"name": "gateway", "ray_actor_options": {"num_cpus": 0.1}}]}]}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def server(ray_session: object, runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    port = free_port()
    cfg = _config(tmp_path_factory.mktemp("serve") / "serve.yaml", runs, port)
    assert main(["serve", "--config", str(cfg), "--detach", "--timeout", "240"]) == 0
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _gallery_sample(data: Path, split: str = "gallery") -> tuple[str, bytes]:
    with tarfile.open(sorted(data.glob(f"{split}-*.tar"))[0]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith((".png", ".jpg", ".webp")))
        return member.name.split(".")[0], tar.extractfile(member).read()


def test_health_and_models(server: str) -> None:
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok", "models": 4}
    models = {m["name"]: m for m in requests.get(f"{server}/v1/models", timeout=30).json()["models"]}
    assert set(models) == {"stn", "coop", "faces", "trip"}
    assert models["coop"]["index_size"] > 0 and models["faces"]["index_size"] > 0 and models["faces"]["latent_dim"] > 0
    assert models["stn"]["version"].startswith("step-2-") and models["trip"]["attributes"] == ["hair_dark", "beard"]
    spec = requests.get(f"{server}/openapi.json", timeout=10)
    assert spec.status_code == 200, spec.text[:300]
    paths = spec.json()["paths"]
    assert {"/v1/rank/{model}", "/v1/search/{model}", "/v1/translate/{model}"} <= set(paths)
    for route in ("/v1/rank/{model}", "/v1/rank/{model}/compare", "/v1/search/{model}", "/v1/translate/{model}"):
        documented = paths[route]["post"]["responses"]["200"].get("headers", {})
        assert {"X-Attrlab-Node", "X-Attrlab-Replica"} <= set(documented), (route, documented)


def test_rank_and_compare_match_the_model_in_process(server: str, runs: dict[str, Path]) -> None:
    import ray

    from serve.services import load_service

    imgs = [_png(1), _png(2)]
    r = requests.post(f"{server}/v1/rank/stn", files=[("images", ("a.png", imgs[0])), ("images", ("b.png", imgs[1]))],
                      timeout=60)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert "served_by" not in r.json()  # who answered travels in headers: the serving replica's node and id
    assert r.headers["X-Attrlab-Node"] in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert r.headers["X-Attrlab-Replica"]
    local = load_service("stn", runs["stn_ranker"])
    want = local.rank([np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in imgs])
    assert len(results) == 2 and set(results[0]["scores"]) == set(local.attributes())
    for got, exp in zip(results, want):
        assert got["scores"] == pytest.approx(exp["scores"], abs=1e-4)
        assert all(0 <= v <= 1 for box in got["boxes"].values() for v in box)
    c = requests.post(f"{server}/v1/rank/stn/compare", json={"pairs": [[_b64(imgs[0]), _b64(imgs[1])],
                                                                        [_b64(imgs[0]), _b64(imgs[0])]]}, timeout=60)
    probs = c.json()["results"]
    s0, s1 = want[0]["scores"], want[1]["scores"]
    for name in s0:  # P(first > second) = sigmoid(s_a - s_b); a pair of one image is 0.5
        assert probs[0]["p_first"][name] == pytest.approx(1 / (1 + np.exp(-(s0[name] - s1[name]))), abs=1e-3)
        assert probs[1]["p_first"][name] == pytest.approx(0.5, abs=1e-6)
    assert c.headers["X-Attrlab-Node"] == r.headers["X-Attrlab-Node"]  # one replica of stn in this app
    t = requests.post(f"{server}/v1/rank/trip/compare", json={"pairs": [[_b64(imgs[0]), _b64(imgs[1])]]}, timeout=60)
    assert t.status_code == 200 and all(0 <= p <= 1 for p in t.json()["results"][0]["p_first"].values())


def test_search_finds_the_gallery_image_itself(server: str, tiny_attrworld: Path) -> None:
    key, data = _gallery_sample(tiny_attrworld)
    r = requests.post(f"{server}/v1/search/coop", json={"image": _b64(data), "k": 3}, timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["results"][0]
    assert len(hits) == 3 and hits[0]["key"] == key and hits[0]["distance"] == pytest.approx(0, abs=1e-4)
    assert hits[0]["distance"] <= hits[1]["distance"] <= hits[2]["distance"]


def test_coop_term_and_subspace_search_match_a_numpy_oracle(server: str, runs: dict[str, Path],
                                                             tiny_attrworld: Path) -> None:
    """Sec. 4.2's queries over HTTP: an attribute value's term in its subspace, a category's term
    in the whole space, an image in one subspace — the same keys as a brute-force numpy ranking."""
    from models.knn import load_saved_index
    from models.retrieval import l2_normalize_subspaces

    index_dir = runs["coop_embed"] / "index" / "gallery-flat"
    index, keys, meta = load_saved_index(index_dir)
    t = dict(np.load(index_dir / "terms.npz"))
    gallery = index.index.reconstruct_n(0, index.ntotal)
    names = [str(a) for a in t["attributes"]]

    def oracle(q: np.ndarray, g: np.ndarray, k: int) -> list[str]:
        return [keys[i] for i in np.argsort(((g - q) ** 2).sum(1), kind="stable")[:k]]

    row = next(i for i in range(len(t["kind"])) if t["kind"][i] == "attribute")
    attr, value = str(t["attribute"][row]), str(t["value"][row])
    a, b = t["slices"][names.index(attr)]
    q = t["mean"][row][a:b] / np.linalg.norm(t["mean"][row][a:b])
    r = requests.post(f"{server}/v1/search/coop", json={"attribute": attr, "value": value, "k": 5}, timeout=60)
    assert r.status_code == 200, r.text
    assert [h["key"] for h in r.json()["results"][0]] == oracle(q, gallery[:, a:b], 5)

    crow = next(i for i in range(len(t["kind"])) if t["kind"][i] == "category")
    blocks = [slice(x, y) for x, y in meta["normalisation"]["blocks"]]
    cq = l2_normalize_subspaces(t["mean"][crow][None], blocks)[0]
    c = requests.post(f"{server}/v1/search/coop", json={"category": str(t["value"][crow]), "k": 5}, timeout=60)
    assert [h["key"] for h in c.json()["results"][0]] == oracle(cq, gallery, 5)

    key, data = _gallery_sample(tiny_attrworld)
    s = requests.post(f"{server}/v1/search/coop", json={"image": _b64(data), "subspace": attr, "k": 4}, timeout=60)
    hits = s.json()["results"][0]
    assert hits[0]["distance"] == pytest.approx(0, abs=1e-4) and len(hits) == 4
    info = next(m for m in requests.get(f"{server}/v1/models", timeout=30).json()["models"] if m["name"] == "coop")
    assert set(info["terms"]["attributes"]) == set(names) and info["terms"]["categories"]


def test_face_search_by_latent_and_by_image(server: str, runs: dict[str, Path]) -> None:
    from models.latent_index import PreferenceIndex

    idx = PreferenceIndex.load(next((runs["latent_retrieval"] / "index").iterdir()))
    w = idx.latent(3).astype(float).tolist()
    r = requests.post(f"{server}/v1/search/faces", json={"latent": w, "k": 4}, timeout=60)
    assert r.status_code == 200, r.text
    hits = r.json()["results"][0]
    assert hits[0]["key"] == idx.keys[3] and hits[0]["distance"] == pytest.approx(0, abs=1e-6) and len(hits) == 4
    # an adjustment moves the target away from the query itself: it is no longer at distance 0
    names = requests.get(f"{server}/v1/models", timeout=30).json()["models"]
    attrs = next(m for m in names if m["name"] == "faces")["attributes"]
    adj = requests.post(f"{server}/v1/search/faces", json={"latent": w, "k": 4, "adjust": {attrs[0]: 1.0},
                                                           "prefer": {attrs[0]: 4.0}}, timeout=60).json()
    assert adj["results"][0][0]["distance"] > 1e-6 or adj["results"][0][0]["key"] != idx.keys[3]
    img = requests.post(f"{server}/v1/search/faces", files={"image": ("f.png", _png(5, 32))}, data={"k": "2"},
                        timeout=60)
    assert img.status_code == 200 and len(img.json()["results"][0]) == 2


def test_translate_returns_a_png_and_a_strip(server: str) -> None:
    r = requests.post(f"{server}/v1/translate/trip", json={"image": _b64(_png(7)), "v": [1.0, -0.5]}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["X-Model-Version"].startswith("step-") and r.headers["X-Attrlab-Node"]
    one = Image.open(io.BytesIO(r.content))
    strip = requests.post(f"{server}/v1/translate/trip", files={"image": ("x.png", _png(7))},
                          data={"v": "[1.0, -0.5]", "steps": "3"}, timeout=60)
    wide = Image.open(io.BytesIO(strip.content))
    assert wide.size == (3 * one.size[0], one.size[1])


def _metrics_text() -> str:
    """Ray's metrics export of every node (Prometheus text format, concatenated): what Prometheus
    scrapes. A replica's metrics are exported by its own node, which may be either of the two."""
    import ray

    return "\n".join(requests.get(f"http://127.0.0.1:{n['MetricsExportPort']}/metrics", timeout=10).text
                     for n in ray.nodes() if n["Alive"])


def _sample(text: str, name: str, **tags: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in tags.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_requests_share_batches(server: str) -> None:
    def counts() -> tuple[float, float]:  # (model calls, calls of one item) of stn's rank so far
        text = _metrics_text()
        return (_sample(text, "ray_attrlab_batch_size_count", model="stn", op="rank"),
                _sample(text, "ray_attrlab_batch_size_bucket", model="stn", op="rank", le="1.0"))

    # the counters are cumulative (earlier tests, earlier apps serving a model named "stn"): wait until
    # they are still, then count this test's calls as the difference
    before, deadline = counts(), time.time() + 30
    while time.time() < deadline:
        time.sleep(3)
        now = counts()
        if now == before:
            break
        before = now
    img = _b64(_png(11))
    with cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: requests.post(f"{server}/v1/rank/stn", json={"images": [img]},
                                                      timeout=120).status_code, range(32)))
    assert codes == [200] * 32
    deadline, batches, singles = time.time() + 60, 0.0, 0.0
    while time.time() < deadline:  # Ray exports metrics every few seconds
        now = counts()
        batches, singles = now[0] - before[0], now[1] - before[1]
        if batches and batches > singles:
            break
        time.sleep(2)
    # 32 items in `batches` model calls; a call of more than one item shows in the buckets above le=1
    assert batches > singles, f"no batch of more than one item: {batches} batches, {singles} of size 1"
    assert batches < 32


def _malformed(server: str) -> list[tuple[str, Any, int, str]]:
    png = _png(3)
    big = _png(4, size=400)  # > max_image_bytes of this app (200 kB) once noisy
    url = server
    return [
        ("wrong content type", lambda: requests.post(f"{url}/v1/rank/stn", data="x", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
        ("invalid json", lambda: requests.post(f"{url}/v1/rank/stn", data="{", headers={"Content-Type": "application/json"}), 400, "body"),
        ("json not an object", lambda: requests.post(f"{url}/v1/rank/stn", json=[1, 2]), 400, "body"),
        ("undecodable image", lambda: requests.post(f"{url}/v1/rank/stn", files={"image": ("a.png", b"not an image")}), 415, "image"),
        ("bad base64", lambda: requests.post(f"{url}/v1/rank/stn", json={"image": "%%%"}), 400, "image"),
        ("oversized image", lambda: requests.post(f"{url}/v1/rank/stn", files={"image": ("a.png", big)}), 413, "image"),
        ("too many images", lambda: requests.post(f"{url}/v1/rank/stn", json={"images": [_b64(png)] * 9}), 413, "images"),
        ("no image", lambda: requests.post(f"{url}/v1/rank/stn", json={}), 422, "images"),
        ("unknown model", lambda: requests.post(f"{url}/v1/rank/nope", json={"image": _b64(png)}), 404, "model"),
        ("route the model lacks", lambda: requests.post(f"{url}/v1/rank/coop", json={"image": _b64(png)}), 404, "model"),
        ("translate on a ranker", lambda: requests.post(f"{url}/v1/translate/stn", json={"image": _b64(png), "v": [1]}), 404, "model"),
        ("compare without pairs", lambda: requests.post(f"{url}/v1/rank/stn/compare", json={"image": _b64(png)}), 422, "pairs"),
        ("k too large", lambda: requests.post(f"{url}/v1/search/coop", json={"image": _b64(png), "k": 21}), 422, "k"),
        ("k zero", lambda: requests.post(f"{url}/v1/search/coop", json={"image": _b64(png), "k": 0}), 422, "k"),
        ("k not an integer", lambda: requests.post(f"{url}/v1/search/coop", json={"image": _b64(png), "k": "3.5"}), 422, "k"),
        ("v wrong length", lambda: requests.post(f"{url}/v1/translate/trip", json={"image": _b64(png), "v": [0.5]}), 422, "v"),
        ("v out of range", lambda: requests.post(f"{url}/v1/translate/trip", json={"image": _b64(png), "v": [2, 0]}), 422, "v"),
        ("v NaN", lambda: requests.post(f"{url}/v1/translate/trip", data=json.dumps({"image": _b64(png), "v": [float("nan"), 0]}),
                                        headers={"Content-Type": "application/json"}), 422, "v"),
        ("v not numbers", lambda: requests.post(f"{url}/v1/translate/trip", json={"image": _b64(png), "v": ["a", 0]}), 422, "v"),
        ("steps too many", lambda: requests.post(f"{url}/v1/translate/trip", json={"image": _b64(png), "v": [1, 0], "steps": 99}), 422, "steps"),
        ("latent wrong length", lambda: requests.post(f"{url}/v1/search/faces", json={"latent": [0.1, 0.2]}), 422, "latent"),
        ("latent with inf", lambda: requests.post(f"{url}/v1/search/faces", data='{"latent": [Infinity]}',
                                                  headers={"Content-Type": "application/json"}), 422, "latent"),
        ("adjust unknown attribute", lambda: requests.post(f"{url}/v1/search/faces", json={"image": _b64(png), "adjust": {"wings": 1}}), 422, "adjust"),
        ("adjust out of range", lambda: requests.post(f"{url}/v1/search/faces", json={"image": _b64(png), "adjust": {"smile": 3}}), 422, "adjust"),
        ("negative preference", lambda: requests.post(f"{url}/v1/search/faces", json={"image": _b64(png), "prefer": {"smile": -1}}), 422, "prefer"),
        ("image and latent", lambda: requests.post(f"{url}/v1/search/faces", json={"image": _b64(png), "latent": [0.0]}), 422, "latent"),
        ("unknown term attribute", lambda: requests.post(f"{url}/v1/search/coop", json={"attribute": "wings", "value": "1"}), 422, "attribute"),
        ("term without value", lambda: requests.post(f"{url}/v1/search/coop", json={"attribute": "smile"}), 422, "value"),
        ("unknown category", lambda: requests.post(f"{url}/v1/search/coop", json={"category": "no-such"}), 422, "category"),
        ("image and term", lambda: requests.post(f"{url}/v1/search/coop", json={"image": _b64(png), "category": "x"}), 422, "image"),
        ("unknown subspace", lambda: requests.post(f"{url}/v1/search/coop", json={"image": _b64(png), "subspace": "wings"}), 422, "subspace"),
        ("unknown route", lambda: requests.get(f"{url}/v1/nothing"), 404, "path"),
        ("wrong method", lambda: requests.get(f"{url}/v1/rank/stn"), 405, "method"),
    ]


def test_malformed_requests_are_4xx_naming_the_field_and_the_server_keeps_answering(server: str) -> None:
    cases = _malformed(server)
    assert len(cases) >= 20
    for name, send, status, field in cases:
        r = send()
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        body = r.json()["error"]
        assert body["field"] == field and body["message"], (name, body)
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
    ok = requests.post(f"{server}/v1/rank/stn", json={"image": _b64(_png(1))}, timeout=60)
    assert ok.status_code == 200


def test_prometheus_scrapes_attrlab_metrics(server: str, tmp_path: Path) -> None:
    """A real Prometheus (installed by the project if missing) on loopback scrapes Ray's metrics
    export; attrlab's request latency is found through its HTTP query API."""
    import ray

    from cluster.prometheus import ensure_prometheus, query, start_prometheus, write_config, write_sd_file

    ensure_prometheus()
    for i in range(3):
        requests.post(f"{server}/v1/rank/stn", json={"image": _b64(_png(20 + i))}, timeout=60)
    # the test cluster runs without Ray's dashboard, which writes the service-discovery file: write ours
    sd = write_sd_file(tmp_path / "sd.json", [f"127.0.0.1:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]])
    cfg = write_config(tmp_path / "prometheus.yml", [sd], scrape_interval="1s")
    with start_prometheus(cfg, tmp_path / "prom") as prom:
        assert prom.url.startswith("http://127.0.0.1:")
        deadline, found = time.time() + 60, []
        while time.time() < deadline and not found:
            found = query(prom.url, 'ray_attrlab_request_latency_seconds_count{route="/v1/rank",model="stn"}')
            time.sleep(1)
        assert found and sum(float(r["value"][1]) for r in found) >= 3
        requests.get(f"{server}/v1/models", timeout=30)
        deadline, info = time.time() + 40, []
        while time.time() < deadline and not info:
            info = query(prom.url, 'ray_attrlab_model_info{model="coop"} == 1')
            time.sleep(1)
        assert info and info[0]["metric"]["version"].startswith("step-")


def test_a_rolling_update_under_a_trickle_of_requests_loses_none(server: str, runs: dict[str, Path],
                                                                 tiny_attrworld: Path, tmp_path: Path) -> None:
    """A new stn checkpoint (a run of 4 steps replacing the 2-step one) deployed with `attrlab serve`
    while requests keep arriving: every request answers 200, and the version changes."""
    new_run = tmp_path / "stn_v2"
    assert main(["train", "stn_ranker", "--data", str(tiny_attrworld), "--out", str(new_run), "--local",
                 "--max-steps", "4", *SMALL]) == 0
    port = int(server.rsplit(":", 1)[1])
    cfg = _config(tmp_path / "serve.yaml", runs, port, stn_run=new_run)
    img = _b64(_png(9))
    statuses: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                r = requests.post(f"{server}/v1/rank/stn", json={"image": img}, timeout=60)
                statuses.append(r.status_code)
                versions.append(r.json().get("version", "?") if r.status_code == 200 else "?")
            except requests.RequestException as e:  # a dropped connection is a lost request
                statuses.append(-1)
                versions.append(str(e)[:80])
            time.sleep(0.05)

    t = threading.Thread(target=trickle)
    t.start()
    try:
        assert main(["serve", "--config", str(cfg), "--detach", "--timeout", "240"]) == 0
        deadline = time.time() + 60
        while time.time() < deadline and not (versions and versions[-1].startswith("step-4-")):
            time.sleep(0.5)
    finally:
        stop.set()
        t.join()
    assert len(statuses) > 10 and set(statuses) == {200}, [s for s in statuses if s != 200][:5]
    assert versions[0].startswith("step-2-") and versions[-1].startswith("step-4-")
