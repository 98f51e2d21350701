"""`attrlab demo`: the main job end to end on the embedded default, one local Ray cluster throughout.

1. shards: build attrworld, cluttered_digits and attrworld's 32 px translation build
   (TRANSLATION_OPTIONS: larger, cleaner faces), and validate them;
2. start a local Ray cluster (token auth on, dashboard on loopback: cluster/connect.py);
3. train stn_ranker, coop_embed (attrworld), deml (cluttered_digits), the attribute oracle and trip
   (translation build), an identity model (coop_embed on the 32 px build) and latent_retrieval,
   each with 2 Ray Train workers running DeepSpeed over gloo, on short budgets (progress bars);
4. a small Ray Tune sweep: coop_embed's loss weights, 2 trials under ASHA (jobs/spaces/coop_embed.yaml);
5. evaluate each run, build coop_embed's and deml's faiss indexes and latent_retrieval's exact
   preference index, write the reports;
6. deploy the five models on Ray Serve (OUT/serve.yaml), send one request per route over HTTP,
   shut Serve down (serve/demo.py);
7. print one summary table: method, metric, value, report, endpoint — and the time of each phase.
Re-running resumes: verified shards are skipped and a finished run is only re-evaluated.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded datasets")
    p.add_argument("--out", type=Path, default=Path("data"))
    p.add_argument("--workers", type=int, default=2, help="shard writers and training workers")
    p.add_argument("--steps", type=int, default=200, help="stn_ranker training steps")
    p.add_argument("--coop-steps", type=int, default=200, help="coop_embed training steps")
    p.add_argument("--deml-steps", type=int, default=150, help="deml training steps")
    p.add_argument("--oracle-steps", type=int, default=200, help="attr_oracle training steps")
    p.add_argument("--trip-steps", type=int, default=200, help="trip training steps")
    p.add_argument("--identity-steps", type=int, default=200, help="identity model (coop_embed, 32 px) steps")
    p.add_argument("--latent-steps", type=int, default=150, help="latent_retrieval training steps")
    p.add_argument("--sweep-trials", type=int, default=2, help="coop_embed sweep trials (0: no sweep)")
    p.add_argument("--sweep-steps", type=int, default=60, help="steps per sweep trial")
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
        write_dataset(plan_embedded(name, opts), root, shard_size=500, workers=workers, overwrite=True)  # the demo's own folder
        built = time.perf_counter() - t0
        problems, _ = validate(root)
        print(summary(root))
        print(f"  built in {built:.1f} s; validate: {'OK' if not problems else f'{len(problems)} problems'}")
        for p in problems[:10]:
            print(f"  BAD {p}")
        ok &= not problems
    return ok


def _train_args(method: str, data: Path, run: Path, workers: int, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    # one validation, at the end: each one costs seconds a short demo run cannot spare
    sets = [*extra, f"checkpoint.every_steps={max(1, steps // 2)}", f"eval.every_steps={steps}",
            "schedule.log_every=10", "scaling.cpus_per_worker=1", "data.loader.num_workers=0"]
    if method == "stn_ranker":  # centre crop at test time (the config's default is the paper's 10 crops): 1/10 the eval
        sets += [f"model.stage1_steps={steps // 3}", "model.tta_crops=1"]
    if method == "trip":
        # width 16: 1.4 min vs 3.6 at width 32 on 2 CPU workers (the demo is a smoke run; the quality
        # benchmark's width 32, jobs/configs/trip.yaml, is measured in docs/RESULTS.md)
        sets += [f"model.pretrain_steps={steps // 3}", f"model.oracle={(run.parent / 'attr_oracle').resolve()}",
                 "model.g_base=16"]
    return ["train", method, "--data", str(data), "--out", str(run), "--workers", str(workers),
            "--max-steps", str(steps), *[x for s in sets for x in ("--set", s)]]


def _sweep_args(data: Path, out: Path, trials: int, steps: int) -> list[str]:
    sets = [f"eval.every_steps={max(1, steps // 3)}", f"checkpoint.every_steps={max(1, steps // 3)}",
            "scaling.cpus_per_worker=0.9", "data.loader.num_workers=0", "schedule.log_every=10"]
    return ["tune", "coop_embed", "--data", str(data), "--out", str(out), "--trials", str(trials),
            "--max-steps", str(steps), "--workers-per-trial", "1", "--max-concurrent", "2", "--reduction-factor", "2",
            *[x for s in sets for x in ("--set", s)]]


# what the summary shows per run: (run name, metric key)
SUMMARY = [("stn_ranker", "rank_acc"), ("stn_ranker", "stn_hit"), ("coop_embed", "instance_r@1"),
           ("coop_embed", "attribute_map"), ("coop_embed", "category_map"), ("deml", "r@1"), ("deml", "r@8"),
           ("deml", "sim"), ("attr_oracle", "oracle_score"), ("trip", "spearman_v"), ("trip", "aas"),
           ("trip", "ssim_std"), ("trip", "nontarget_change"), ("trip", "fid_oracle"),
           ("latent_retrieval", "ndcg@5"), ("latent_retrieval", "ndcg@20"), ("latent_retrieval", "identity_sim"),
           ("latent_retrieval", "ifg/ndcg@5"), ("latent_retrieval", "ortho_err")]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path.resolve())


def summary(runs: dict[str, Path], sweep: tuple[str, float, str] | None, endpoints: dict[str, str]) -> str:
    """The closing table: one row per metric, the report it is drawn in and where the model was served."""
    lines = [f"{'method':17s} {'metric':17s} {'value':>9s}  {'report':52s} endpoint"]
    shown: set[str] = set()
    for name, key in SUMMARY:
        m = json.loads((runs[name] / "metrics.json").read_text()) if (runs[name] / "metrics.json").is_file() else {}
        if key not in m:
            continue
        report = runs[name] / "report" / "index.html"
        endpoint = endpoints.get(name, "") if name not in shown else ""
        shown.add(name)
        lines.append(f"{name:17s} {key:17s} {m[key]:9.3g}  {_rel(report) if report.is_file() else '-':52s} {endpoint}")
    if sweep is not None:
        key, best, page = sweep
        lines.append(f"{'sweep coop_embed':17s} {key.removeprefix('val/'):17s} {best:9.3g}  {page:52s} (best of the trials)")
    return "\n".join(lines)


def run_sweep(data: Path, out: Path, trials: int, steps: int) -> tuple[str, float, str] | None:
    from jobs.cli import main as attrlab
    from jobs.tune_report import best_row, collect

    if attrlab(_sweep_args(data, out, trials, steps)) != 0:
        return None
    sweep = json.loads((out / "sweep.json").read_text())
    row = best_row(sweep, collect(out, sweep, {}))
    return sweep["metric"], float(row["best"]), _rel(out / "results.html")


def cmd_demo(a: argparse.Namespace) -> int:
    from cluster.connect import connect
    from jobs.cli import main as attrlab

    t_start = time.perf_counter()
    phases: list[tuple[str, float]] = []

    def phase(name: str, t0: float) -> None:
        phases.append((name, time.perf_counter() - t0))

    print("[1/6] building and validating the embedded datasets' shards ...")
    t0 = time.perf_counter()
    if not build_shards(a.out, a.workers):
        return 1
    phase("shards", t0)
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
    import ray

    t0 = time.perf_counter()
    # 4 logical CPUs on 2 cores: the sweep's two 1-worker trials and Serve's replicas fit beside each other
    connect(num_cpus=max(4, a.workers))
    print(f"[2/6] local Ray cluster: {ray.cluster_resources().get('CPU', 0):g} logical CPUs, token auth "
          f"{'off' if os.environ.get('RAY_AUTH_MODE', '').lower() == 'disabled' else 'on'}, dashboard on loopback")
    try:
        for name, (run, steps, shards) in runs.items():
            method = "coop_embed" if name == "identity" else name
            print(f"\n[3/6 train] {name}: {method}, {steps} steps, {a.workers} Ray Train workers (DeepSpeed, gloo)")
            if attrlab(_train_args(method, shards, run, a.workers, steps, extra.get(name, ()))) != 0:
                return 1
        phase("training (7 runs)", t0)
        t0 = time.perf_counter()
        sweep = None
        if a.sweep_trials > 0:
            print(f"\n[4/6 sweep] coop_embed: {a.sweep_trials} trials x {a.sweep_steps} steps, ASHA, 2 at a time")
            sweep = run_sweep(data, a.out / "sweeps" / "coop_embed", a.sweep_trials, a.sweep_steps)
            if sweep is None:
                return 1
        phase("sweep", t0)
        t0 = time.perf_counter()
        print("\n[5/6] evaluating, indexing and reporting ...")
        coop, deml, trip, latent = (runs[n][0] for n in ("coop_embed", "deml", "trip", "latent_retrieval"))
        for cmd in (["eval", str(runs["stn_ranker"][0])], ["report", str(runs["stn_ranker"][0])], ["eval", str(coop)],
                    ["index", str(coop), "--data", str(data)], ["report", str(coop)], ["eval", str(deml)],
                    ["index", str(deml)], ["report", str(deml)], ["eval", str(runs["attr_oracle"][0])],
                    ["eval", str(trip)], ["report", str(trip)], ["eval", str(latent)],
                    ["index", str(latent), "--kind", "preference"], ["report", str(latent)]):
            print(f"  attrlab {' '.join(cmd)}", flush=True)
            if attrlab(cmd) != 0:
                return 1
        phase("eval + index + report", t0)
        from serve.demo import serve_demo

        t0 = time.perf_counter()
        print("\n[6/6] serving")
        endpoints = serve_demo(a.out, {name: run for name, (run, _, _) in runs.items()},
                               {"attrworld": data, "digits": digits, "faces": faces})
        phase("serve", t0)
    finally:
        ray.shutdown()
    print("\n" + summary({name: run for name, (run, _, _) in runs.items()}, sweep, endpoints))
    print("\n" + "  ".join(f"{n} {s:.0f} s" for n, s in phases))
    print(f"demo finished in {time.perf_counter() - t_start:.0f} s; shards under {_rel(a.out / 'shards')}; "
          f"serve the models again with: attrlab serve --config {_rel(a.out / 'serve.yaml')}")
    return 0
