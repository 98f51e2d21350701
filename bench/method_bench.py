"""`attrlab bench methods`: each method's training samples/s and inference ms/image on this machine.

  methods/train_{method}  samples/s of the in-process loop (`attrlab train --local`) on the
                          method's default config (jobs/configs/METHOD.yaml) and its embedded
                          data (attrworld; cluttered_digits for deml; the 32 px translation build
                          for latent_retrieval and trip), STEPS steps in a fresh run directory,
                          the first WARMUP_ROWS log rows skipped (bench/train_bench.py). Changed
                          from the defaults: stages that train a part of the model first start at
                          0 (stn_ranker's stage1_steps, trip's pretrain_steps), so the window
                          times the full objective; validation and checkpoints only after the
                          last step; knobs of the validation alone are cut (its cost is not timed).
  methods/infer_{method}  ms/image of the call a Serve route makes (serve/services.py
                          load_service(...): rank / search / encode + preference search /
                          translate), in this process, at batch 1 (ours) and batch 32 (baseline;
                          ratio = the per-image speed-up of batching). The run is RUNS/METHOD
                          (`make demo`'s data/runs) when it loads, else the run trained for the
                          train figure above (with its index built).

--smoke: tiny 32 px attrworld for every method, 3 steps with tiny shapes, batches 1 and 4.
A sample is what the loader batches: a pair of images for stn_ranker, one image for the rest.
Torch runs its default thread count (all cores) here: these are per-machine figures.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.core import Row, row
from bench.train_bench import WARMUP_ROWS, shards, steady_rate, train

METHODS = ("stn_ranker", "coop_embed", "deml", "latent_retrieval", "trip")
DATA = {"stn_ranker": "attrworld", "coop_embed": "attrworld", "deml": "cluttered_digits",
        "latent_retrieval": "attrworld_faces32", "trip": "attrworld_faces32"}
INDEX_ARGS = {"coop_embed": [], "deml": [], "latent_retrieval": ["--kind", "preference"]}

STEPS, LOG_EVERY = 50, 10
SMOKE_STEPS, SMOKE_LOG_EVERY = 3, 1

# full runs: default config; stages off, validation-only knobs small (they cost time after the window)
FULL_SETS: dict[str, list[str]] = {
    "stn_ranker": ["model.stage1_steps=0", "model.tta_crops=1"],
    "coop_embed": [],
    "deml": ["model.curve_images=100"],
    "latent_retrieval": ["model.fit_iters=50", "model.fit_samples=2000", "model.queries=50", "model.lams=[0.005]",
                         "model.figure_images=0"],
    "trip": ["model.pretrain_steps=0", "model.eval_images=16"],
}
# --smoke: tiny shapes on the 32 px smoke attrworld (the sizes tests/test_serve.py trains with)
SMOKE_SETS: dict[str, list[str]] = {
    "stn_ranker": ["data.augment.resize=32", "data.augment.size=28", "data.loader.batch_size=6",
                   "model.stage1_steps=0", "model.tta_crops=1"],
    "coop_embed": ["data.augment.resize=32", "data.augment.size=28", "data.loader.batch_size=8",
                   "data.loader.classes_per_batch=3", "data.loader.images_per_class=2", "schedule.warmup_steps=1",
                   "model.subspace_width=4"],
    "deml": ["data.augment.resize=32", "data.augment.size=32", "data.loader.classes_per_batch=3",
             "data.loader.images_per_class=2", "schedule.warmup_steps=1", "model.dim=16", "model.curve_images=20"],
    "latent_retrieval": ["data.loader.batch_size=8", "model.code_dim=8", "model.ae_base=8", "model.lams=[0.0]",
                         "model.fit_iters=20", "model.queries=20", "data.test_split=train", "data.val_split=train",
                         "model.figure_images=0"],
    "trip": ["data.loader.batch_size=4", "model.pretrain_steps=0", "model.eval_images=4",
             "model.attributes=[hair_dark,beard]", "data.val_split=train"],
}
SMOKE_COMMON = ["data.loader.num_workers=0", "data.loader.shuffle_buffer=60", "deepspeed.enabled=false"]


def method_sets(method: str, smoke: bool, steps: int, log_every: int) -> list[str]:
    sets = [*(SMOKE_SETS if smoke else FULL_SETS)[method], f"schedule.log_every={log_every}",
            f"eval.every_steps={steps}", f"checkpoint.every_steps={steps}", "tracking.enabled=false"]
    return [*sets, *SMOKE_COMMON] if smoke else sets


# ------------------------------------------------------------------------------------ inference
def _images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def inference_call(svc: Any, method: str) -> tuple[str, int, Callable[[list[np.ndarray]], Any]]:
    """(what, input side, f(images)): the call the method's Serve route makes for these images."""
    size = int(getattr(svc.cfg.model, "image_size", 0) or svc.cfg.data.augment.resize)
    if method == "stn_ranker":
        return "rank", size, svc.rank
    if method in ("coop_embed", "deml"):
        return "search k=10", size, lambda ims: svc.search(ims, 10)
    k = len(svc.attributes())
    if method == "latent_retrieval":
        def latent(ims: list[np.ndarray]) -> Any:
            adjust = np.full((len(ims), k), np.nan)
            prefer = np.zeros((len(ims), k))
            adjust[:, 0], prefer[:, 0] = 1.0, 2.0
            return svc.search(svc.encode(ims), adjust, prefer, 10)
        return "encode + preference search k=10", size, latent
    return "translate", size, lambda ims: svc.translate(ims, np.ones((len(ims), k), np.float32), 1)


def ms_per_image(f: Callable[[list[np.ndarray]], Any], images: list[np.ndarray], repeats: int) -> float:
    f(images)  # warm-up: first-call allocations, lazy faiss / torch init
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(images)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / len(images)


def serving_run(ctx: Any, method: str, trained: Path) -> tuple[Any, Path]:
    """The service over RUNS/METHOD when it loads, else over `trained` (its index built first)."""
    from jobs.cli import main
    from serve.services import load_service
    from shards.format import ShardError

    demo = Path(ctx.runs) / method
    if not ctx.smoke and demo.is_dir():
        try:
            return load_service(method, demo), demo
        except (ShardError, FileNotFoundError, ValueError, KeyError):
            pass
    if method in INDEX_ARGS:
        idx = trained / "index"
        if not idx.is_dir() or not any(idx.iterdir()):
            argv = ["index", str(trained), *INDEX_ARGS[method]]
            if main(argv) != 0:
                raise RuntimeError(f"attrlab {' '.join(argv)} failed")
    return load_service(method, trained), trained


# ------------------------------------------------------------------------------------ figures
def run(ctx: Any) -> list[Row]:
    import torch

    steps, log_every = (SMOKE_STEPS, SMOKE_LOG_EVERY) if ctx.smoke else (STEPS, LOG_EVERY)
    after = min(WARMUP_ROWS * log_every, steps - log_every)
    batches, repeats = ((1, 4), (2, 1)) if ctx.smoke else ((1, 32), (30, 5))
    threads = torch.get_num_threads()
    rows: list[Row] = []
    for method in METHODS:
        data = shards(ctx, DATA[method])
        run_dir = Path(ctx.work) / "methods" / method
        t0 = time.perf_counter()
        train(method, data, run_dir, steps, method_sets(method, ctx.smoke, steps, log_every), local=True)
        wall = time.perf_counter() - t0
        rate, n = steady_rate(run_dir, after)
        rows.append(row(f"methods/train_{method}", f"{method}: training samples/s, in-process loop on CPU "
                        f"({'a sample = a pair of images' if method == 'stn_ranker' else 'a sample = an image'})",
                        rate, "samples/s",
                        note=f"{'smoke shapes' if ctx.smoke else 'jobs/configs/' + method + '.yaml'} on "
                        f"{data.name}; steps {after + 1}-{steps} ({n} steps; first {after} skipped); "
                        f"{threads} torch threads; DeepSpeed {'off' if ctx.smoke else 'ZeRO 0, world of 1'}; "
                        f"the run (with its final validation + checkpoint) took {wall:.0f} s"))

        svc, used = serving_run(ctx, method, run_dir)
        what, size, f = inference_call(svc, method)
        b1, bn = (ms_per_image(f, _images(b, size), r) for b, r in zip(batches, repeats))
        rows.append(row(f"methods/infer_{method}", f"{method}: inference ms/image through serve/services.py "
                        f"({what}), batch 1 vs batch {batches[1]}, in-process on CPU", b1, "ms/image",
                        baseline=bn, baseline_label=f"same call, batch {batches[1]}", ratio=b1 / bn,
                        note=f"ratio: per-image speed-up of batch {batches[1]} over batch 1; {size} px uint8 "
                        f"inputs; median of {repeats[0]} / {repeats[1]} calls after one warm-up; {threads} torch "
                        f"threads; run {used}"))
    return rows
