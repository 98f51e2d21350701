"""`attrlab bench train`: what Ray Train, a second node and DeepSpeed cost the one training loop.

Every figure trains stn_ranker (the default 64 px config on the embedded attrworld shards, built
under WORK/shards/ when missing; --smoke: 32 px, 96 images, batch 6) through `attrlab train`
itself (jobs.cli.main), in fresh run directories under WORK/train/, and reads rank 0's
`samples_per_s` rows from RUN_DIR/train_log.jsonl. The first WARMUP_ROWS rows (graph warm-up,
first shard reads, worker start-up) are skipped and every run is measured over the same step
window; the window's rate is sum(steps) / sum(steps / samples_per_s), i.e. its samples over its
seconds. Validation and checkpoints happen only after the last logged step, outside the window.

  train/ray_overhead      TorchTrainer, 1 worker  vs  the same loop in this process (--local)
  train/scaling_2workers  2 workers, one per Ray node (STRICT_SPREAD)  vs  2 x the 1-worker rate
  train/deepspeed_vs_ddp  2 workers: DeepSpeed (ZeRO 0) vs deepspeed.enabled=false, ms per step

Every worker and the in-process loop run one torch thread and no loader process
(data.loader.num_workers=0): on this 2-core machine a worker is one core, so the comparison is
the same computation on the same core budget. (Ray gives a Train worker OMP_NUM_THREADS =
floor(CPUs), at least 1, and torch follows it: 1 thread at 0.5 and 1 CPU, 2 at 2 CPUs; jobs/
itself never sets torch's threads, so the in-process loop would use every core: set to 1 here.) Ray: the session's Ray when one is connected
(the test suite's 2-node cluster), else a 2-node ray.cluster_utils.Cluster on this machine
(2 logical CPUs per node, OMP_NUM_THREADS=1 for its workers), shut down afterwards.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bench.core import Row, at_least, row, torch_threads

REPO = Path(__file__).resolve().parents[1]
WARMUP_ROWS = 2


@dataclass(frozen=True)
class Sizes:
    steps: int       # schedule.max_steps of every run
    log_every: int   # one samples_per_s row per this many steps
    sets: tuple[str, ...]  # --set overrides on top of jobs/configs/stn_ranker.yaml
    cpus_per_worker: float


def sizes(smoke: bool) -> Sizes:
    common = ("data.loader.num_workers=0", "model.stage1_steps=0", "model.tta_crops=1", "tracking.enabled=false")
    if smoke:
        return Sizes(steps=4, log_every=1, cpus_per_worker=0.5, sets=common + (
            "data.augment.resize=32", "data.augment.size=28", "data.loader.batch_size=6",
            "data.loader.shuffle_buffer=32"))
    return Sizes(steps=100, log_every=10, cpus_per_worker=1.0, sets=common)


# ------------------------------------------------------------------------------------ data
SMOKE_ATTRWORLD = dict(size=32, count=96, options={"images_per_identity": "8", "pairs_per_attribute": "200",
                                                   "clutter": "4"})


def shards(ctx: Any, name: str = "attrworld") -> Path:
    """The shard set `name` (attrworld | cluttered_digits | attrworld_faces32) under WORK/shards,
    built when it has no manifest yet; --smoke: one tiny 32 px attrworld stands in for every name."""
    from shards.datasets import BuildOptions, plan_embedded
    from shards.writer import write_dataset

    root = Path(ctx.work) / "shards" / ("attrworld" if ctx.smoke else name)
    if (root / "manifest.json").is_file():
        return root
    if ctx.smoke:
        dataset, opts = "attrworld", BuildOptions(seed=0, **SMOKE_ATTRWORLD)
    elif name == "attrworld_faces32":
        from jobs.quickstart import TRANSLATION_BUILD

        dataset, opts = "attrworld", BuildOptions(**TRANSLATION_BUILD)
    else:
        dataset, opts = name, BuildOptions()
    write_dataset(plan_embedded(dataset, opts), root, shard_size=16 if ctx.smoke else 500,
                  workers=1 if ctx.smoke else 2, progress=not ctx.smoke, overwrite=True)
    return root


# ------------------------------------------------------------------------------------ runs
def train(method: str, data: Path, run: Path, steps: int, sets: list[str] | tuple[str, ...],
          *, local: bool, workers: int | None = None) -> Path:
    """`attrlab train` into a fresh `run` (a finished run would only resume: nothing to measure)."""
    from jobs.cli import main

    shutil.rmtree(run, ignore_errors=True)
    argv = ["train", method, "--data", str(data), "--out", str(run), "--max-steps", str(steps),
            *[a for s in sets for a in ("--set", s)]]
    if local:
        argv.append("--local")
    if workers is not None:
        argv += ["--workers", str(workers)]
    rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"attrlab {' '.join(argv)}: exit {rc}")
    return run


def log_rows(run: Path) -> list[dict[str, Any]]:
    """The training rows of RUN_DIR/train_log.jsonl (those with samples_per_s), in step order."""
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "samples_per_s" in r]


def steady_rate(run: Path, after_step: int) -> tuple[float, int]:
    """(samples/s, steps) over the logged windows ending after `after_step`: the window's samples
    over its seconds, sum(steps_i) / sum(steps_i / samples_per_s_i) (samples per step are constant)."""
    prev, steps, seconds_per_sample_step = 0, 0, 0.0
    for r in log_rows(run):
        n = r["step"] - prev
        prev = r["step"]
        if r["step"] <= after_step:
            continue
        steps += n
        seconds_per_sample_step += n / r["samples_per_s"]
    if steps == 0:
        raise RuntimeError(f"{run}: no training rows after step {after_step} in train_log.jsonl")
    return steps / seconds_per_sample_step, steps


def samples_per_step(run: Path) -> int:
    """Samples in one optimiser step over every rank: micro batch x grad_accum x workers (the
    run's saved config; stn_ranker's loader is not class-balanced, so micro = batch_size)."""
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return cfg["data"]["loader"]["batch_size"] * cfg["schedule"]["grad_accum"] * cfg["scaling"]["workers"]


@contextlib.contextmanager
def ray_two_nodes(cpus_per_node: int = 2) -> Iterator[bool]:
    """The connected Ray, or a 2-node Ray cluster on this machine started (and shut down) here;
    yields True when it started one."""
    import ray

    if ray.is_initialized():
        yield False
        return
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    node = {"num_cpus": cpus_per_node, "object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}})
        yield True
    finally:
        ray.shutdown()
        cluster.shutdown()


def cpu_nodes(cpus: float) -> int:
    """Alive Ray nodes with at least `cpus` CPUs (what STRICT_SPREAD needs per worker)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= cpus)


# ------------------------------------------------------------------------------------ figures
def run(ctx: Any) -> list[Row]:
    sz = sizes(ctx.smoke)
    data = shards(ctx)
    work = Path(ctx.work) / "train"
    after = WARMUP_ROWS * sz.log_every
    base = [*sz.sets, f"schedule.log_every={sz.log_every}", f"eval.every_steps={sz.steps}",
            f"checkpoint.every_steps={sz.steps}", f"scaling.cpus_per_worker={sz.cpus_per_worker:g}"]
    t0 = time.perf_counter()
    with ray_two_nodes() as started:
        spread = "STRICT_SPREAD" if cpu_nodes(sz.cpus_per_worker) >= 2 else "PACK"
        # Ray first, then the in-process run: a cluster started here must not inherit the
        # RANK / WORLD_SIZE / MASTER_PORT that run_local puts in this process's environment
        with torch_threads(1):
            local = train("stn_ranker", data, work / "local", sz.steps, base, local=True)
        one = train("stn_ranker", data, work / "ray_1worker", sz.steps, base, local=False, workers=1)
        two = [*base, f"scaling.placement_strategy={spread}"]
        ds2 = train("stn_ranker", data, work / "ray_2workers_ds", sz.steps, two, local=False, workers=2)
        plain2 = train("stn_ranker", data, work / "ray_2workers_plain", sz.steps, [*two, "deepspeed.enabled=false"],
                       local=False, workers=2)
    wall = time.perf_counter() - t0
    r_local, n = steady_rate(local, after)
    r_one, _ = steady_rate(one, after)
    r_ds2, _ = steady_rate(ds2, after)
    r_plain2, _ = steady_rate(plain2, after)
    window = f"steps {after + 1}-{sz.steps} ({n} steps, first {after} skipped as warm-up)"
    cfg = (f"stn_ranker, {'smoke 32 px' if ctx.smoke else 'default 64 px config'}, "
           f"{samples_per_step(local)} pairs/step/worker, 1 torch thread + no loader process per worker")
    ray_src = "a 2-node Ray cluster started here" if started else "the connected Ray"
    where = f"{ray_src}, {'one worker per node' if spread == 'STRICT_SPREAD' else 'ONE node with CPUs: PACK'}"
    rows: list[Row] = []

    ratio = r_one / r_local
    goal, met = at_least(ratio, 0.95)
    ms_local, ms_one = (1000 * samples_per_step(r) / rate for r, rate in ((local, r_local), (one, r_one)))
    rows.append(row("train/ray_overhead", "training samples/s under Ray TorchTrainer (1 worker) vs the same loop "
                    "in-process (attrlab train --local)", r_one, "samples/s", baseline=r_local,
                    baseline_label="in-process loop", ratio=ratio, goal=goal, met=met,
                    note=f"{cfg}; {window}; DeepSpeed ZeRO 0 on both; {ms_one:.0f} vs {ms_local:.0f} ms/step; "
                    f"{ray_src}; the 4 runs took {wall:.0f} s"))

    eff = r_ds2 / (2 * r_one)
    goal, met = at_least(eff, 0.8)
    per_step = samples_per_step(ds2)
    ms2, ms1 = 1000 * per_step / r_ds2, ms_one
    rows.append(row("train/scaling_2workers", "2-worker data-parallel samples/s over twice the 1-worker rate "
                    f"(workers on 2 Ray nodes, {spread})", r_ds2, "samples/s", baseline=2 * r_one,
                    baseline_label="2 x 1 worker", ratio=eff, goal=goal, met=met,
                    note=f"{cfg}; {window}; 1 worker {r_one:.3g} samples/s ({ms1:.0f} ms/step), 2 workers "
                    f"{ms2:.0f} ms/step incl. the gradient all-reduce over gloo; {where}; {os.cpu_count()} cores in "
                    "all: each worker computes on 1 thread, and the Ray processes (GCS, 2 raylets, the Train "
                    "controller) and gloo share the same cores"))

    ms_ds = 1000 * per_step / r_ds2
    ms_plain = 1000 * samples_per_step(plain2) / r_plain2
    rows.append(row("train/deepspeed_vs_ddp", "ms per optimiser step, 2 workers: DeepSpeed (ZeRO 0) vs plain torch "
                    "data parallel (deepspeed.enabled=false)", ms_ds, "ms/step", baseline=ms_plain,
                    baseline_label="plain torch data parallel: gradients all-reduced after backward in DDP's 25 MB "
                    "buckets (jobs/engine.py; DDP would also overlap them with backward)",
                    ratio=ms_plain / ms_ds,
                    note=f"{cfg}; {window}; ratio > 1: DeepSpeed faster; same model, micro-batch and placement "
                    f"({spread}); both all-reduce flat gradient buckets over gloo after backward (ZeRO 0 does not "
                    "overlap them either)"))
    return rows
