"""Benchmark: exact preference-weighted latent retrieval (models/latent_index.py) vs numpy.

    python -m bench.latent_search --n 1000000 --dim 512 --attrs 8 --queries 50 --k 10 \
        [--method certified|flat] [--shards 0] [--out runs/bench_latent_search]

Random Gaussian gallery latents (seeded, float32), a random orthonormal F, fresh random queries,
per query a random preference p (about a quarter zeros, "don't care") and, for every other query,
an adjusted attribute target c_t (Eq. 4). Timed one query per call, as a serving request is:
  index   PreferenceIndex.search (faiss first pass + certified float64 re-rank)
  numpy   c = F^T w and ||r||^2 precomputed; per query one float32 BLAS pass over the gallery
          (r_q . w), the Eq. 3 distance in float32, argpartition of the top k + 64, float64
          re-rank of those (not certified; its exactness is counted too)
Both are checked against brute_force (the float64 oracle) on every query. Prints a table and
writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

from models.latent_index import PreferenceIndex, _dist, _rows_cr, brute_force


def make_data(a: argparse.Namespace) -> dict:
    rng = np.random.default_rng(a.seed)
    W = np.empty((a.n, a.dim), np.float32)
    for s in range(0, a.n, 1 << 16):  # float32 straight from the generator: no float64 gallery copy
        W[s:s + (1 << 16)] = rng.standard_normal((min(1 << 16, a.n - s), a.dim), dtype=np.float32)
    F = np.linalg.qr(rng.standard_normal((a.dim, a.attrs)))[0]
    n_q = a.queries + a.warmup
    wq = rng.standard_normal((n_q, a.dim))
    p = rng.uniform(0.0, 3.0, (n_q, a.attrs)) * (rng.random((n_q, a.attrs)) > 0.25)
    ct = [None if i % 2 else wq[i] @ F + rng.normal(0.0, 1.5, a.attrs) for i in range(n_q)]
    return {"W": W, "F": F, "wq": wq, "p": p, "ct": ct}


class NumpyBaseline:
    """What one would write without faiss: the query-independent parts precomputed once (c = F^T w
    and ||r||^2, float32), then per query one float32 BLAS pass over the gallery (r_q . w), the
    Eq. 3 distance in float32, argpartition of the top k + extra and a float64 re-rank of those."""

    def __init__(self, W: np.ndarray, F: np.ndarray, extra: int = 64) -> None:
        self.W, self.F, self.extra = W, F, extra
        self.C = np.empty((len(W), F.shape[1]), np.float32)
        self.nr = np.empty(len(W), np.float32)
        for s in range(0, len(W), 1 << 14):
            c, r = _rows_cr(W[s:s + (1 << 14)], F)
            self.C[s:s + len(c)], self.nr[s:s + len(c)] = c, (r * r).sum(1)

    def search(self, w_q: np.ndarray, p: np.ndarray, k: int,
               c_target: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        F = self.F
        cq = w_q @ F
        rq = w_q - F @ cq
        ct = cq if c_target is None else c_target
        # d = sum p (ct - c)^2 + ||r_q||^2 - 2 r_q.r + ||r||^2, and r_q.r = r_q.w as F^T r_q = 0
        d = self.W @ (-2.0 * rq).astype(np.float32)
        d += self.nr
        d += ((self.C - ct.astype(np.float32)) ** 2) @ p.astype(np.float32)
        cand = np.argpartition(d, k + self.extra)[:k + self.extra]
        cc, rr = _rows_cr(self.W[cand], F)
        de = _dist(cc, rr, ct, rq, p)
        o = np.lexsort((cand, de))[:k]
        return de[o][None], cand[o].astype(np.int64)[None]


def timed(fn: Callable, data: dict, k: int, warmup: int) -> tuple[list[float], list[float], np.ndarray, np.ndarray]:
    """Wall ms and process CPU ms (all threads) per single-query call, after `warmup` calls."""
    ms, cpu, ids, dist = [], [], [], []
    for i in range(len(data["wq"])):
        t0, c0 = time.perf_counter(), time.process_time()
        d, j = fn(data["wq"][i], data["p"][i], k, data["ct"][i])
        dt, dc = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
        if i >= warmup:
            ms.append(dt)
            cpu.append(dc)
            ids.append(j[0])
            dist.append(d[0])
    return ms, cpu, np.stack(ids), np.stack(dist)


def summary(ms: list[float], cpu: list[float]) -> dict:
    q = statistics.quantiles(ms, n=20)
    return {"p50_ms": statistics.median(ms), "p95_ms": q[18], "mean_ms": statistics.fmean(ms), "min_ms": min(ms),
            "cpu_ms_p50": statistics.median(cpu)}


def oracle(data: dict, k: int, warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """brute_force over all timed queries: one call for the default-target queries, one for the rest."""
    n = len(data["wq"])
    ids, dist = np.empty((n, k), np.int64), np.empty((n, k))
    default = np.array([c is None for c in data["ct"]])
    for sel, ct in ((np.flatnonzero(default), None), (np.flatnonzero(~default), "set")):
        sel = sel[sel >= warmup]
        if len(sel):
            c = None if ct is None else np.stack([data["ct"][i] for i in sel])
            dist[sel], ids[sel] = brute_force(data["W"], data["F"], data["wq"][sel], data["p"][sel], k, c)
    return dist[warmup:], ids[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--attrs", type=int, default=8)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--method", choices=("certified", "flat"), default="certified")
    ap.add_argument("--shards", type=int, default=0, help="faiss shards (0 = one per core)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed queries first (page faults, caches)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-numpy", action="store_true", help="skip the numpy baseline")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_latent_search"))
    a = ap.parse_args()

    data = make_data(a)
    load = os.getloadavg()
    t0 = time.perf_counter()
    index = PreferenceIndex.build(data["W"], data["F"], method=a.method, shards=a.shards)
    build_s = time.perf_counter() - t0
    ms, cpu, ids, dist = timed(index.search, data, a.k, a.warmup)
    res = {"index": {**summary(ms, cpu), "build_s": build_s, "shards": index.shards, **index.stats}}
    if not a.no_numpy:
        base = NumpyBaseline(data["W"], data["F"])
        nms, ncpu, nids, _ = timed(base.search, data, a.k, a.warmup)
        res["numpy"] = summary(nms, ncpu)
    t0 = time.perf_counter()
    od, oi = oracle(data, a.k, a.warmup)
    oracle_s = time.perf_counter() - t0
    res["index"]["exact_queries"] = int((ids == oi).all(1).sum())
    res["index"]["max_abs_dist_err"] = float(np.abs(dist - od).max())
    if "numpy" in res:
        res["numpy"]["exact_queries"] = int((nids == oi).all(1).sum())
        res["qps_ratio_index_over_numpy"] = res["numpy"]["mean_ms"] / res["index"]["mean_ms"]

    print(f"{a.n} x {a.dim} latents, M={a.attrs}, k={a.k}, {a.queries} single queries, method={a.method}, "
          f"{index.shards} shards, {os.cpu_count()} cpus; build {build_s:.1f} s, oracle {oracle_s:.0f} s")
    print(f"load average before: {load[0]:.2f} (other processes may share the cores: wall times include "
          "waiting for them; CPU ms = this process's CPU time, all threads)")
    print(f"{'':<8} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} {'min ms':>8} {'CPU ms':>8} {'exact':>7}")
    for name in ("index", "numpy"):
        if name in res:
            r = res[name]
            print(f"{name:<8} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['mean_ms']:>8.1f} {r['min_ms']:>8.1f} "
                  f"{r['cpu_ms_p50']:>8.1f} {r['exact_queries']:>3}/{a.queries}")
    print(f"widened {index.stats['widened']}x, fallback {index.stats['fallback']}x over "
          f"{index.stats['queries']} queries (warm-up included)")
    if "qps_ratio_index_over_numpy" in res:
        print(f"QPS index / numpy: {res['qps_ratio_index_over_numpy']:.2f}x")
    print(f"goal: exact and < 50 ms per query -> "
          f"{'met' if res['index']['exact_queries'] == a.queries and res['index']['p50_ms'] < 50 else 'NOT met'} (p50)")
    res.update(loadavg_before=load[0], args={k: str(v) for k, v in vars(a).items()}, oracle_s=oracle_s,
               machine=platform.processor() or platform.machine(),
               max_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"latent_search_{a.method}_{a.n}x{a.dim}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
