"""`attrlab demo`: the main job end to end on the embedded default (grows with each method).

1. build the attrworld and cluttered_digits shards and validate them;
2. start a local Ray cluster and train stn_ranker with 2 workers (DeepSpeed over gloo) on a
   short budget;
3. evaluate it on the test split, write the report, print accuracy and the report path.
Re-running resumes: verified shards are skipped and a finished run is only re-evaluated.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded datasets")
    p.add_argument("--out", type=Path, default=Path("data"))
    p.add_argument("--workers", type=int, default=2, help="shard writers and training workers")
    p.add_argument("--steps", type=int, default=600, help="stn_ranker training steps")
    p.set_defaults(func=cmd_demo)


def build_shards(out: Path, workers: int) -> bool:
    from shards.cli import summary
    from shards.datasets import BuildOptions, plan_embedded
    from shards.validate import validate
    from shards.writer import write_dataset

    ok = True
    for name in ("attrworld", "cluttered_digits"):
        root = out / "shards" / name
        t0 = time.perf_counter()
        write_dataset(plan_embedded(name, BuildOptions()), root, shard_size=500, workers=workers)
        built = time.perf_counter() - t0
        problems, _ = validate(root)
        print(summary(root))
        print(f"  built in {built:.1f} s; validate: {'OK' if not problems else f'{len(problems)} problems'}")
        for p in problems[:10]:
            print(f"  BAD {p}")
        ok &= not problems
    return ok


def cmd_demo(a: argparse.Namespace) -> int:
    import ray

    from jobs.cli import main as attrlab

    t_start = time.perf_counter()
    if not build_shards(a.out, a.workers):
        return 1
    data, run = a.out / "shards" / "attrworld", a.out / "runs" / "stn_ranker"
    print(f"\n[stn_ranker] training {a.steps} steps with {a.workers} Ray Train workers (DeepSpeed, gloo) ...")
    ray.init(num_cpus=max(2, a.workers), include_dashboard=False, log_to_driver=False)
    try:
        code = attrlab(["train", "stn_ranker", "--data", str(data), "--out", str(run), "--workers", str(a.workers),
                        "--max-steps", str(a.steps), "--set", f"model.stage1_steps={a.steps // 3}",
                        "--set", f"checkpoint.every_steps={max(1, a.steps // 2)}",
                        "--set", f"eval.every_steps={max(1, a.steps // 4)}", "--set", "schedule.log_every=25",
                        "--set", "scaling.cpus_per_worker=1", "--set", "data.loader.num_workers=0"])
    finally:
        ray.shutdown()
    if code != 0:
        return code
    for cmd in (["eval", str(run)], ["report", str(run)]):
        if attrlab(cmd) != 0:
            return 1
    m = json.loads((run / "metrics.json").read_text())
    print("\nmethod      metric     value   report")
    print(f"stn_ranker  rank_acc   {m['rank_acc']:.3f}   {(run / 'report' / 'index.html').resolve()}")
    if "stn_hit" in m:
        print(f"stn_ranker  stn_hit    {m['stn_hit']:.3f}")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s; shards under {(a.out / 'shards').resolve()}")
    return 0
