"""`attrlab bench retrieval`: faiss flat / IVF / HNSW vs numpy brute force, and latent_retrieval's
exact preference search, as bench.core rows.

Rows (full size; --smoke: n=2000, dim 32, 10 queries; preference search n=5000, dim 32):

  retrieval/flat_{n}   exact k=10 search: attrlab's k-NN layer (models/knn.py FaissIndex "flat",
                       squared L2, as `attrlab index` builds by default) vs numpy brute force; reported
  retrieval/ivf_{n}    IndexIVFFlat, nlist = 4 sqrt(n), at the smallest nprobe with recall@10 >= 0.95
  retrieval/hnsw_{n}   IndexHNSWFlat M=32 (efConstruction 40, knn.py's default), smallest efSearch likewise
                       (both: goal ">= 5x at recall@10 >= 0.95": ratio >= 5 and the recall measured)
  retrieval/latent_preference_1m   PreferenceIndex.search (certified) vs bench/latent_search.py's
                       numpy baseline, p50 ms/query, exact against the float64 oracle on every query

for n in 100k and 1M x 512, 100 queries; the preference row at 1M x 512, M=8, 50 queries, on the
machine's threads as latent_search.py runs it (one shard per core). Timing: one query per call
(serving answers one request at a time), after a few untimed warm-up queries; QPS = timed queries / their summed wall time. Both sides run on ONE
thread (faiss OpenMP and both OpenBLAS pools limited with threadpoolctl), as models/knn.py runs
faiss on machines with <= 4 cores; the flat row's note adds both sides on all of the machine's
threads and a batched (all queries in one call) figure. Single IVF / HNSW queries do not use more
threads (faiss splits their work across queries), so those rows are 1-thread only. Index builds
use every core and are timed separately (note), never inside the QPS.

Data: a seeded random Gaussian gallery with a power-law spectrum (coordinate i has variance
1/(i+1)^SPECTRUM, effective dimension ~28 at 512-d, the way PCA spectra of learned embeddings
decay), rows L2-normalised as coop_embed's blocks are before indexing; queries are fresh draws from
the same distribution. Isotropic data (SPECTRUM = 0) is the worst case for any approximate index
(all neighbours nearly equidistant) and says little about embeddings. The exact oracle for
recall@10 is the numpy baseline itself, cross-checked against faiss flat (flat row's note).
Nothing large is cached: a 1M x 512 gallery is 2 GB and is regenerated in seconds from its seed.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np

from bench.core import Row, row

K = 10
RECALL_GOAL, SPEEDUP_GOAL = 0.95, 5.0
SPECTRUM = 1.0  # variance of coordinate i ~ 1/(i+1)^SPECTRUM; 0 = isotropic
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
HNSW_M, HNSW_EFC = 32, 40
IVF_TRAIN_PER_LIST, IVF_NITER = 32, 10  # k-means on 32 x nlist points, 10 iterations (1M: ~2 min, not ~15)
ADD_CHUNK = 1 << 16
LATENT_GOAL_MS = 50.0


# ------------------------------------------------------------------------------------ threads
def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """faiss's OpenMP and every BLAS pool (numpy's, faiss's) at `n` threads inside the block."""
    import faiss
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        faiss.omp_set_num_threads(prev)


def _log(msg: str) -> None:
    print(f"[retrieval] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data
def make_gallery(n: int, dim: int, seed: int, spectrum: float | None = None) -> np.ndarray:
    """[n, dim] float32, Gaussian with variance 1/(i+1)^spectrum (default SPECTRUM) per coordinate, rows
    L2-normalised; generated in float32 chunks (no float64 copy of a 2 GB gallery)."""
    spectrum = SPECTRUM if spectrum is None else spectrum
    rng = np.random.default_rng(seed)
    scale = (np.arange(1, dim + 1, dtype=np.float32) ** np.float32(-spectrum / 2))
    X = np.empty((n, dim), np.float32)
    for s in range(0, n, ADD_CHUNK):
        x = rng.standard_normal((min(ADD_CHUNK, n - s), dim), dtype=np.float32)
        x *= scale
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        X[s:s + len(x)] = x
    return X


def numpy_search(X: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids of one unit query against unit rows: one BLAS GEMV (X @ q), argpartition,
    sort of the k (on unit vectors the largest inner products are the smallest squared L2)."""
    s = X @ q
    j = np.argpartition(s, len(s) - k)[len(s) - k:]
    return j[np.argsort(-s[j], kind="stable")].astype(np.int64)


def numpy_search_batch(X: np.ndarray, Q: np.ndarray, k: int, chunk: int = 25) -> np.ndarray:
    """The batched form: one GEMM per `chunk` queries ([chunk, n] scores), then argpartition per row."""
    out = np.empty((len(Q), k), np.int64)
    for s in range(0, len(Q), chunk):
        S = Q[s:s + chunk] @ X.T
        j = np.argpartition(S, S.shape[1] - k, axis=1)[:, S.shape[1] - k:]
        o = np.argsort(-np.take_along_axis(S, j, 1), axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(j, o, 1)
    return out


def recall_at_k(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |got_q ∩ truth_q| / k, as one integer ratio (so 95/100 compares equal to 0.95)."""
    hits = sum(len(np.intersect1d(g[g >= 0], t)) for g, t in zip(got, truth))
    return hits / truth.size


# ------------------------------------------------------------------------------------ timing
def time_single(search: Callable[[np.ndarray], np.ndarray], Q: np.ndarray, warmup: int) -> dict[str, Any]:
    """One query per call; `warmup` untimed calls first (page faults, caches). -> ids [nq, k], qps, p50."""
    for i in range(min(warmup, len(Q))):
        search(Q[i])
    ms, ids = [], []
    c0 = time.process_time()
    for q in Q:
        t0 = time.perf_counter()
        ids.append(search(q))
        ms.append((time.perf_counter() - t0) * 1e3)
    cpu = time.process_time() - c0
    wall = sum(ms) / 1e3
    return {"ids": np.stack(ids), "qps": len(Q) / wall, "p50_ms": statistics.median(ms),
            "cpu_per_wall": cpu / wall}


def _faiss_one(index: Any) -> Callable[[np.ndarray], np.ndarray]:
    return lambda q: index.search(q[None], K)[1][0]


def _add(index: Any, X: np.ndarray, desc: str) -> float:
    """Add X in chunks with a progress bar; returns seconds."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=len(X), desc=desc, unit="vec", unit_scale=True, file=sys.stderr,
              disable=len(X) <= ADD_CHUNK) as pb:
        for s in range(0, len(X), ADD_CHUNK):
            index.add(X[s:s + ADD_CHUNK])
            pb.update(min(ADD_CHUNK, len(X) - s))
    return time.perf_counter() - t0


def _sweep(index: Any, set_param: Callable[[int], None], values: tuple[int, ...], Q: np.ndarray,
           truth: np.ndarray) -> tuple[int, float, list[tuple[int, float]]]:
    """Recall@k per value (batched search, same queries as timed), smallest value reaching the goal
    (search cost grows with it, so that is the fastest one); else the last value tried."""
    tried = []
    for v in values:
        set_param(v)
        r = recall_at_k(index.search(Q, K)[1], truth)
        tried.append((v, r))
        if r >= RECALL_GOAL:
            break
    v, r = tried[-1]
    set_param(v)
    return v, r, tried


# ------------------------------------------------------------------------------------ figures
def bench_size(n: int, dim: int, nq: int, warmup: int, seed: int = 0) -> tuple[list[Row], dict]:
    """The flat / ivf / hnsw rows at one gallery size; each index is freed before the next is built."""
    from models.knn import configure_faiss_threads

    configure_faiss_threads(1)  # what models/knn.py picks on <= 4 cores; FaissIndex keeps it
    t0 = time.perf_counter()
    X = make_gallery(n, dim, seed)
    Q = make_gallery(nq, dim, seed + 1)
    _log(f"{n:,} x {dim} gallery, {nq} queries generated in {time.perf_counter() - t0:.1f} s")
    s = _Size(X, Q, warmup, f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}m", seed)
    # numpy brute force: the baseline of every row, and the exact oracle for recall
    with threads(1):
        npy = time_single(lambda q: numpy_search(X, q, K), Q, warmup)
    s.npy, s.truth = npy, npy["ids"]
    res: dict[str, Any] = {"n": n, "dim": dim, "queries": nq, "threads_machine": s.T,
                           "numpy": {k: v for k, v in npy.items() if k != "ids"}}
    rows = []
    for name, fn in (("flat", _flat), ("ivf", _ivf), ("hnsw", _hnsw)):
        r, res[name] = fn(s)
        gc.collect()
        rows.append(r)
    return rows, res


class _Size:
    """One gallery size's shared inputs: data, queries, the numpy baseline's result."""

    def __init__(self, X: np.ndarray, Q: np.ndarray, warmup: int, tag: str, seed: int) -> None:
        self.X, self.Q, self.warmup, self.tag, self.seed = X, Q, warmup, tag, seed
        self.n, self.dim, self.nq, self.T = len(X), X.shape[1], len(Q), cpus()
        self.npy: dict[str, Any] = {}
        self.truth = np.empty((0, K), np.int64)

    def data(self) -> str:
        return f"{self.n:,} x {self.dim} unit float32 (power-law spectrum), {self.nq} queries"


SAME = "1 thread each side, one query per call"


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "ids"}


def _flat(s: _Size) -> tuple[Row, dict]:
    import faiss

    from models.knn import build_index

    X, Q, npy = s.X, s.Q, s.npy
    flat = build_index("flat", s.dim, "l2")
    with threads(s.T):
        build_s = _add(flat, X, f"flat {s.tag}")
    with threads(1):
        fl = time_single(_faiss_one(flat), Q, s.warmup)
    agree = int((fl["ids"] == s.truth).all(1).sum())
    with threads(s.T):  # the machine's threads, both sides (faiss >= 1.13 splits one query over the database)
        fl_t = time_single(_faiss_one(flat), Q, s.warmup)
        np_t = time_single(lambda q: numpy_search(X, q, K), Q, s.warmup)
    with threads(1):  # batched: all queries in one call; BLAS from 20 queries on (DESIGN.md's pitfall)
        prev = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 20 * s.dim  # faiss 1.15 compares nq * dim with it
        try:
            t = time.perf_counter()
            flat.search(Q, K)
            fb = s.nq / (time.perf_counter() - t)
        finally:
            faiss.cvar.distance_compute_blas_threshold = prev
        t = time.perf_counter()
        numpy_search_batch(X, Q, K)
        nb = s.nq / (time.perf_counter() - t)
    r = row(
        f"retrieval/flat_{s.tag}", f"exact k={K} search, {s.data()}, squared L2: attrlab FaissIndex flat vs numpy "
        f"(BLAS GEMV X@q + argpartition), {SAME}", fl["qps"], "queries/s", baseline=npy["qps"],
        baseline_label="numpy brute force",
        note=f"top-{K} equal to numpy's on {agree}/{s.nq} queries; p50 {fl['p50_ms']:.2f} ms (numpy "
             f"{npy['p50_ms']:.2f}); {s.T} threads: faiss {fl_t['qps']:.4g} q/s, numpy {np_t['qps']:.4g} q/s; "
             f"batched ({s.nq} queries per call, 1 thread, blas threshold {20 * s.dim}): faiss {fb:.4g} q/s, "
             f"numpy {nb:.4g} q/s; add {build_s:.1f} s; cpu/wall {fl['cpu_per_wall']:.2f}")
    return r, {**_plain(fl), "agree_with_numpy": agree, "build_s": build_s,
               "machine_threads": {"faiss_qps": fl_t["qps"], "numpy_qps": np_t["qps"]},
               "batched": {"faiss_qps": fb, "numpy_qps": nb}}


def _ivf(s: _Size) -> tuple[Row, dict]:
    from models.knn import build_index

    nlist = max(1, int(round(4 * math.sqrt(s.n))))
    ivf = build_index("ivf", s.dim, "l2", nlist=nlist, nprobe=1)
    ivf.index.cp.niter = IVF_NITER
    ivf.index.cp.min_points_per_centroid = 1  # we choose the sample size; no faiss warning
    m = min(s.n, IVF_TRAIN_PER_LIST * nlist)
    with threads(s.T):
        t = time.perf_counter()
        ivf.index.train(s.X[np.sort(np.random.default_rng(s.seed + 2).choice(s.n, m, replace=False))])
        train_s = time.perf_counter() - t
        add_s = _add(ivf, s.X, f"ivf {s.tag}")
    with threads(1):
        nprobe, rec, tried = _sweep(ivf, lambda v: setattr(ivf.index, "nprobe", v),
                                    tuple(p for p in NPROBES if p < nlist) + (nlist,), s.Q, s.truth)
        got = time_single(_faiss_one(ivf), s.Q, s.warmup)
    rec = recall_at_k(got["ids"], s.truth)  # of the timed single-query answers (equal to the sweep's)
    r = _approx_row(s, f"retrieval/ivf_{s.tag}", f"IVFFlat nlist={nlist}", "nprobe", nprobe, rec, tried, got,
                    f"train {train_s:.1f} s (k-means, {m:,} points, {IVF_NITER} iterations) + add {add_s:.1f} s "
                    f"on {s.T} threads")
    return r, {"nlist": nlist, "nprobe": nprobe, "recall": rec, "sweep": tried, "train_s": train_s,
               "add_s": add_s, **_plain(got)}


def _hnsw(s: _Size) -> tuple[Row, dict]:
    from models.knn import build_index

    hnsw = build_index("hnsw", s.dim, "l2", M=HNSW_M, efConstruction=HNSW_EFC, efSearch=16)
    with threads(s.T):
        build_s = _add(hnsw, s.X, f"hnsw {s.tag}")
    with threads(1):
        ef, rec, tried = _sweep(hnsw, lambda v: setattr(hnsw.index.hnsw, "efSearch", v), EF_SEARCHES, s.Q, s.truth)
        got = time_single(_faiss_one(hnsw), s.Q, s.warmup)
    rec = recall_at_k(got["ids"], s.truth)  # of the timed single-query answers (equal to the sweep's)
    r = _approx_row(s, f"retrieval/hnsw_{s.tag}", f"HNSWFlat M={HNSW_M} efConstruction={HNSW_EFC}", "efSearch",
                    ef, rec, tried, got, f"build {build_s:.1f} s on {s.T} threads")
    return r, {"efSearch": ef, "recall": rec, "sweep": tried, "build_s": build_s, **_plain(got)}


def _approx_row(s: _Size, id: str, index: str, param: str, value: int, rec: float,
                tried: list[tuple[int, float]], got: dict, build: str) -> Row:
    npy = s.npy
    ratio = got["qps"] / npy["qps"]
    sweep = ", ".join(f"{v}: {r:.3f}" for v, r in tried)
    return row(
        id, f"k={K} search, {s.data()}: faiss {index} at "
            f"the smallest {param} with recall@{K} >= {RECALL_GOAL} (swept on the timed queries) vs numpy brute "
            f"force, {SAME}", got["qps"], "queries/s", baseline=npy["qps"], baseline_label="numpy brute force",
        ratio=ratio, goal=f">= {SPEEDUP_GOAL:g}x at recall@{K} >= {RECALL_GOAL}",
        met=bool(ratio >= SPEEDUP_GOAL and rec >= RECALL_GOAL),
        note=f"recall@{K} {rec:.3f} at {param}={value} ({param}: recall@{K} = {sweep}); p50 {got['p50_ms']:.3f} ms "
             f"(numpy {npy['p50_ms']:.2f}); {build}, not in the QPS; cpu/wall {got['cpu_per_wall']:.2f}")


def bench_preference(n: int, dim: int, queries: int, warmup: int) -> tuple[Row, dict]:
    """latent_retrieval's exact preference search (bench/latent_search.py's data, baseline, oracle)."""
    from bench.latent_search import NumpyBaseline, make_data, oracle, summary, timed
    from models.latent_index import PreferenceIndex

    a = argparse.Namespace(n=n, dim=dim, attrs=8, queries=queries, warmup=warmup, seed=0)
    data = make_data(a)
    t0 = time.perf_counter()
    index = PreferenceIndex.build(data["W"], data["F"], method="certified", shards=0)
    build_s = time.perf_counter() - t0
    ms, cpu, ids, _ = timed(index.search, data, K, warmup)
    ours = summary(ms, cpu)
    base = NumpyBaseline(data["W"], data["F"])
    nms, ncpu, nids, _ = timed(base.search, data, K, warmup)
    theirs = summary(nms, ncpu)
    del base
    t0 = time.perf_counter()
    _, oi = oracle(data, K, warmup)
    oracle_s = time.perf_counter() - t0
    exact, nexact = int((ids == oi).all(1).sum()), int((nids == oi).all(1).sum())
    subs = getattr(index, "_subs", [])  # code bytes per latent: faiss's own figure, for the bandwidth note
    code = int(subs[0].code_size) if subs and hasattr(subs[0], "code_size") else 0
    scanned_gb = n * code / 1e9
    met = ours["p50_ms"] < LATENT_GOAL_MS and exact == queries
    limit = "" if met else (
        f"; limit: each query scans {scanned_gb:.2f} GB of 8-bit codes ({code} B/latent) in faiss's SQ kernel = "
        f"{scanned_gb / (ours['p50_ms'] / 1e3):.1f} GB/s over {index.shards} threads (decode-bound, ~5.5 GB/s per "
        f"core here): under {LATENT_GOAL_MS:g} ms needs fewer code bytes per latent or more cores" if code else "")
    r = row(
        "retrieval/latent_preference_1m",
        f"latent_retrieval exact preference search, {n:,} x {dim} latents, M=8, k={K}, {queries} single queries "
        f"(half with an adjusted target): PreferenceIndex (certified, {index.shards} shards = threads) vs numpy "
        f"(precomputed c, ||r||^2; float32 GEMV + float64 re-rank; default BLAS threads), p50",
        ours["p50_ms"], "ms/query", baseline=theirs["p50_ms"], baseline_label="numpy", ratio=theirs["p50_ms"] /
        ours["p50_ms"], goal=f"< {LATENT_GOAL_MS:g} ms/query", met=met,
        note=f"exact (vs float64 oracle) {exact}/{queries} (numpy {nexact}/{queries}); p95 {ours['p95_ms']:.1f} ms, "
             f"CPU {ours['cpu_ms_p50']:.1f} ms/query (all threads); build {build_s:.1f} s; widened "
             f"{index.stats['widened']}, fallback {index.stats['fallback']}{limit}")
    res = {"index": ours, "numpy": theirs, "build_s": build_s, "oracle_s": oracle_s, "exact": exact,
           "numpy_exact": nexact, "code_bytes": code, "stats": dict(index.stats)}
    del index, data
    gc.collect()
    return r, res


def run(ctx: Any) -> list[Row]:
    """The retrieval group (bench/cli.py): 3 rows per gallery size, then the preference-search row."""
    if ctx.smoke:
        sizes, dim, nq, warmup, pref = (2000,), 32, 10, 2, (5000, 32, 10, 2)
    else:
        sizes, dim, nq, warmup, pref = (100_000, 1_000_000), 512, 100, 5, (1_000_000, 512, 50, 5)
    rows: list[Row] = []
    raw: dict[str, Any] = {"load_before": os.getloadavg()[0], "spectrum": SPECTRUM}
    for n in sizes:
        t0 = time.perf_counter()
        got, raw[f"n{n}"] = bench_size(n, dim, nq, warmup)
        rows += got
        _log(f"{n:,}: {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    r, raw["preference"] = bench_preference(*pref)
    rows.append(r)
    _log(f"preference search: {time.perf_counter() - t0:.0f} s")
    raw["load_after"] = os.getloadavg()[0]
    ctx.work.mkdir(parents=True, exist_ok=True)
    (ctx.work / "retrieval.json").write_text(json.dumps(raw, indent=1, default=float))
    return rows
