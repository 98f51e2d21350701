"""`attrlab bench`: every speed figure as a ratio, measured in one run, collected in BENCHMARKS.md.

    attrlab bench all [--smoke] [--md BENCHMARKS.md] [--work data/bench]
    attrlab bench train | data | retrieval | serve | methods | gpu   (one group)

Groups (one module each; a group's function takes a Context and returns bench.core.Row's):
  train      Ray Train overhead (in-process loop vs TorchTrainer, 1 worker), 2-worker scaling on a
             2-node cluster on this machine, DeepSpeed vs plain DDP step time
  data       shard reading vs individual image files (per core), loader vs the step's consumption
  retrieval  faiss flat / IVF / HNSW vs numpy brute force at 100k and 1M x 512 (QPS, recall@10),
             latent_retrieval's exact preference search at 1M
  serve      batched vs unbatched throughput at concurrency 32, p50/p99 per route, Serve overhead
  methods    per method training samples/s and inference ms/image on this machine
  gpu        bf16 training samples/s, MFU, stn_ranker batched inference (only where a GPU is)
--smoke runs each figure on tiny sizes: it checks the rows are well formed, not the speed (the
test suite runs it); smoke rows are printed, never written to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.core import Row, write_markdown

# group -> "module:function"; imported only when run (a group may need Ray, faiss or a GPU)
GROUPS: dict[str, str] = {
    "train": "bench.train_bench:run",
    "data": "bench.data_bench:run",
    "retrieval": "bench.retrieval_bench:run",
    "serve": "bench.serve_figures:run",
    "methods": "bench.method_bench:run",
    "gpu": "bench.gpu_bench:run",
}


@dataclass(frozen=True)
class Context:
    smoke: bool   # tiny sizes: well-formed rows, not speed
    work: Path    # scratch: shards, runs, indexes the figures build (reused between runs)
    runs: Path    # trained run directories (`make demo`'s data/runs) for serve / methods figures


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure every speed figure against its comparison; writes BENCHMARKS.md")
    p.add_argument("group", choices=["all", *GROUPS], help="all, or one group of figures")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the rows, not the speed; writes nothing")
    p.add_argument("--md", type=Path, default=Path("BENCHMARKS.md"), help="the table to merge the rows into")
    p.add_argument("--work", type=Path, default=Path("data/bench"), help="scratch directory (reused)")
    p.add_argument("--runs", type=Path, default=Path("data/runs"), help="trained runs (make demo) for serve/methods")
    p.set_defaults(func=cmd_bench)


def run_group(name: str, ctx: Context) -> list[Row]:
    module, func = GROUPS[name].split(":")
    return getattr(importlib.import_module(module), func)(ctx)


def cmd_bench(a: argparse.Namespace) -> int:
    ctx = Context(smoke=a.smoke, work=a.work / ("smoke" if a.smoke else "full"), runs=a.runs)
    ctx.work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in (GROUPS if a.group == "all" else [a.group]):
        t0 = time.perf_counter()
        print(f"[bench {name}] ...", file=sys.stderr, flush=True)
        got = run_group(name, ctx)
        for r in got:
            r.check()
            verdict = "" if r.met is None else (" met" if r.met else " NOT met")
            ratio = "" if r.ratio is None else f", ratio {r.ratio:.3g}"
            print(f"  {r.id}: {r.ours:.4g} {r.unit}{ratio} (goal {r.goal or '-'}{verdict})", flush=True)
        print(f"[bench {name}] {len(got)} figures in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        rows += got
    if not a.smoke and rows:
        write_markdown(rows, a.md)
        print(f"attrlab: {len(rows)} figures merged into {a.md}", file=sys.stderr)
    return 0
