"""`attrlab demo`: the main job end to end on the embedded default (grows with each method).

1. build the attrworld and cluttered_digits shards, and attrworld's 32 px translation build
   (TRANSLATION_OPTIONS: larger, cleaner faces), and validate them;
2. start a local Ray cluster and train stn_ranker, coop_embed (attrworld), deml
   (cluttered_digits), then the attribute oracle and trip (translation build), then an identity
   model (coop_embed on the 32 px build) and latent_retrieval with 2 workers each (DeepSpeed over
   gloo) on a short budget;
3. evaluate each (stn_ranker: ranking accuracy on the test split; coop_embed: retrieval of unseen
   identities, query -> gallery; deml: zero-shot Recall@K on the unseen digits 5-9; trip: the
   translation metrics judged by the oracle; latent_retrieval: nDCG and identity similarity of
   adjusted queries), build coop_embed's faiss gallery index and latent_retrieval's exact
   preference index, write the reports and print the metrics with the report paths;
4. deploy the five models on a local Ray Serve (OUT/serve.yaml), send one request per route over
   HTTP, print the answers, shut down (serve/demo.py).
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
    p.add_argument("--oracle-steps", type=int, default=400, help="attr_oracle training steps")
    p.add_argument("--trip-steps", type=int, default=300, help="trip training steps")
    p.add_argument("--identity-steps", type=int, default=300, help="identity model (coop_embed, 32 px) steps")
    p.add_argument("--latent-steps", type=int, default=400, help="latent_retrieval training steps")
    p.set_defaults(func=cmd_demo)


# attrworld for translation at 32 px: bigger faces, no subtlety, little clutter, so the smile is
# visible at the size a CPU GAN can train at (the same build as bench/trip_ablation.py)
TRANSLATION_OPTIONS = {"clutter": "2", "subtlety": "0", "face_scale": "0.7,0.8", "rotation": "4", "region_scale": "1.3"}
TRANSLATION_BUILD = dict(size=32, count=4000, options=TRANSLATION_OPTIONS)


def build_shards(out: Path, workers: int) -> bool:
    from shards.cli import summary
    from shards.datasets import BuildOptions, plan_embedded
    from shards.validate import validate
    from shards.writer import write_dataset

    ok = True
    builds = [("attrworld", "attrworld", BuildOptions()), ("cluttered_digits", "cluttered_digits", BuildOptions()),
              ("attrworld", "attrworld_faces32", BuildOptions(**TRANSLATION_BUILD))]
    for name, folder, opts in builds:
        root = out / "shards" / folder
        t0 = time.perf_counter()
        write_dataset(plan_embedded(name, opts), root, shard_size=500, workers=workers)
        built = time.perf_counter() - t0
        problems, _ = validate(root)
        print(summary(root))
        print(f"  built in {built:.1f} s; validate: {'OK' if not problems else f'{len(problems)} problems'}")
        for p in problems[:10]:
            print(f"  BAD {p}")
        ok &= not problems
    return ok


def _train_args(method: str, data: Path, run: Path, workers: int, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [*extra, f"checkpoint.every_steps={max(1, steps // 2)}", f"eval.every_steps={max(1, steps // 2)}",
            "schedule.log_every=25", "scaling.cpus_per_worker=1", "data.loader.num_workers=0"]
    if method == "stn_ranker":
        sets.append(f"model.stage1_steps={steps // 3}")
    if method == "trip":
        sets += [f"model.pretrain_steps={steps // 3}", f"model.oracle={(run.parent / 'attr_oracle').resolve()}"]
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
    faces = a.out / "shards" / "attrworld_faces32"
    runs = {"stn_ranker": (a.out / "runs" / "stn_ranker", a.steps, data),
            "coop_embed": (a.out / "runs" / "coop_embed", a.coop_steps, data),
            "deml": (a.out / "runs" / "deml", a.deml_steps, digits),
            "attr_oracle": (a.out / "runs" / "attr_oracle", a.oracle_steps, faces),  # trip's judge: before trip
            "trip": (a.out / "runs" / "trip", a.trip_steps, faces),
            # latent_retrieval's identity features: coop_embed's instance embedding on the same faces
            "identity": (a.out / "runs" / "identity", a.identity_steps, faces),
            "latent_retrieval": (a.out / "runs" / "latent_retrieval", a.latent_steps, faces)}
    extra = {"identity": ("data.augment.resize=32", "data.augment.size=28"),
             "latent_retrieval": (f"model.identity_run={runs['identity'][0].resolve()}",)}
    ray.init(num_cpus=max(2, a.workers), include_dashboard=False, log_to_driver=False)
    try:
        for name, (run, steps, shards) in runs.items():
            method = "coop_embed" if name == "identity" else name
            print(f"\n[{name}] training {method} {steps} steps with {a.workers} Ray Train workers (DeepSpeed, gloo) ...")
            if attrlab(_train_args(method, shards, run, a.workers, steps, extra.get(name, ()))) != 0:
                return 1
    finally:
        ray.shutdown()
    coop = runs["coop_embed"][0]
    deml = runs["deml"][0]
    trip = runs["trip"][0]
    latent = runs["latent_retrieval"][0]
    for cmd in (["eval", str(runs["stn_ranker"][0])], ["report", str(runs["stn_ranker"][0])], ["eval", str(coop)],
                ["index", str(coop), "--data", str(data)], ["report", str(coop)], ["eval", str(deml)], ["index", str(deml)],
                ["report", str(deml)], ["eval", str(runs["attr_oracle"][0])], ["eval", str(trip)], ["report", str(trip)],
                ["eval", str(latent)], ["index", str(latent), "--kind", "preference"], ["report", str(latent)]):
        if attrlab(cmd) != 0:
            return 1
    rows = [("stn_ranker", k) for k in ("rank_acc", "stn_hit")]
    rows += [("coop_embed", k) for k in ("instance_r@1", "attribute_map", "category_map")]
    rows += [("deml", k) for k in ("r@1", "r@8", "sim")]
    rows += [("attr_oracle", "oracle_score")]
    rows += [("trip", k) for k in ("spearman_v", "aas", "ssim_std", "nontarget_change", "fid_oracle")]
    rows += [("latent_retrieval", k) for k in ("ndcg@5", "ndcg@20", "identity_sim", "ifg/ndcg@5", "ifg/identity_sim",
                                               "l2/ndcg@5", "ortho_err")]
    print(f"\n{'method':18s}{'metric':18s}{'value':>9s}   report")
    for method, key in rows:
        run = runs[method][0]
        m = json.loads((run / "metrics.json").read_text())
        if key in m:
            report = run / "report" / "index.html"
            print(f"{method:18s}{key:18s}{m[key]:9.3g}   {report.resolve() if report.is_file() else ''}")
    from serve.demo import serve_demo

    serve_demo(a.out, {name: run for name, (run, _, _) in runs.items()},
               {"attrworld": data, "digits": digits, "faces": faces})
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s; shards under {(a.out / 'shards').resolve()}")
    return 0
