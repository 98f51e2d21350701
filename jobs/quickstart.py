"""`attrlab demo`: the main job end to end on the embedded default (grows with each method).

1. build the attrworld and cluttered_digits shards and validate them;
2. start a local Ray cluster and train stn_ranker, coop_embed (attrworld) and deml
   (cluttered_digits) with 2 workers each (DeepSpeed over gloo) on a short budget;
3. evaluate each (stn_ranker: ranking accuracy on the test split; coop_embed: retrieval of unseen
   identities, query -> gallery; deml: zero-shot Recall@K on the unseen digits 5-9), build
   coop_embed's faiss gallery index, write the reports and print the metrics with the report paths.
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
    p.add_argument("--steps", type=int, default=500, help="stn_ranker training steps")
    p.add_argument("--coop-steps", type=int, default=300, help="coop_embed training steps")
    p.add_argument("--deml-steps", type=int, default=300, help="deml training steps")
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


def _train_args(method: str, data: Path, run: Path, workers: int, steps: int) -> list[str]:
    sets = [f"checkpoint.every_steps={max(1, steps // 2)}", f"eval.every_steps={max(1, steps // 2)}",
            "schedule.log_every=25", "scaling.cpus_per_worker=1", "data.loader.num_workers=0"]
    if method == "stn_ranker":
        sets.append(f"model.stage1_steps={steps // 3}")
    return ["train", method, "--data", str(data), "--out", str(run), "--workers", str(workers),
            "--max-steps", str(steps), *[x for s in sets for x in ("--set", s)]]


def cmd_demo(a: argparse.Namespace) -> int:
    import ray

    from jobs.cli import main as attrlab

    t_start = time.perf_counter()
    if not build_shards(a.out, a.workers):
        return 1
    data = a.out / "shards" / "attrworld"
    digits = a.out / "shards" / "cluttered_digits"
    runs = {"stn_ranker": (a.out / "runs" / "stn_ranker", a.steps, data),
            "coop_embed": (a.out / "runs" / "coop_embed", a.coop_steps, data),
            "deml": (a.out / "runs" / "deml", a.deml_steps, digits)}
    ray.init(num_cpus=max(2, a.workers), include_dashboard=False, log_to_driver=False)
    try:
        for method, (run, steps, shards) in runs.items():
            print(f"\n[{method}] training {steps} steps with {a.workers} Ray Train workers (DeepSpeed, gloo) ...")
            if attrlab(_train_args(method, shards, run, a.workers, steps)) != 0:
                return 1
    finally:
        ray.shutdown()
    coop = runs["coop_embed"][0]
    deml = runs["deml"][0]
    for cmd in (["eval", str(runs["stn_ranker"][0])], ["report", str(runs["stn_ranker"][0])], ["eval", str(coop)],
                ["index", str(coop), "--data", str(data)], ["report", str(coop)], ["eval", str(deml)],
                ["report", str(deml)]):
        if attrlab(cmd) != 0:
            return 1
    rows = [("stn_ranker", k) for k in ("rank_acc", "stn_hit")]
    rows += [("coop_embed", k) for k in ("instance_r@1", "attribute_map", "category_map")]
    rows += [("deml", k) for k in ("r@1", "r@8", "sim")]
    print(f"\n{'method':12s}{'metric':16s}{'value':>7s}   report")
    for method, key in rows:
        run = runs[method][0]
        m = json.loads((run / "metrics.json").read_text())
        if key in m:
            print(f"{method:12s}{key:16s}{m[key]:7.3f}   {(run / 'report' / 'index.html').resolve()}")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s; shards under {(a.out / 'shards').resolve()}")
    return 0
