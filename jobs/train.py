"""The one training loop for every method, in-process (`--local`) or in Ray Train workers.

    run_loop(job, reporter) builds the model and optimisers through the method registry,
    streams batches from the shards, steps, validates, checkpoints and resumes.

Ray and DeepSpeed are thin layers: `ray_worker_entry` is the TorchTrainer's per-worker function
(Ray has already set up torch.distributed), `run_local` sets up a world of one itself.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from jobs import checkpoints
from jobs.engine import Engines
from models import registry
from models.registry import StepInfo
from shards.augment import AugmentConfig
from shards.format import read_meta
from shards.reader import make_loader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    method: str
    cfg_dict: dict[str, Any]  # the resolved config, as plain data (travels to Ray workers)
    data: str
    run_dir: str


class FaultInjected(RuntimeError):
    """Raised once at checkpoint.fail_at_step by the in-process loop (Ray workers are killed instead)."""


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def device_for_worker() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        from shards.format import ShardError

        raise ShardError(f"deepspeed.precision=bf16: not supported on {device}; use 'auto' or 'fp32'")
    return torch.bfloat16 if supported else None


def train_loader(method: registry.Method, cfg: Any, data: str | Path) -> Any:
    """This rank's training loader for `method` (also what bench/data_bench.py times)."""
    kind = method.data_kind
    # a pair-trained model that ranks a subset of attributes reads only those pairs
    ranked = tuple(getattr(cfg.model, "attributes", ())) if kind == "pairs" else ()
    return make_loader(data, cfg.data.train_split, mode="train", cfg=cfg.data.loader, augment=cfg.data.augment,
                       kind="pairs" if kind == "pairs" else "samples",
                       batching="class_balanced" if kind == "class_balanced" else "none", pair_attributes=ranked)


def infinite(loader: Any) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        loader.dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


class EvalData:
    """Single-process access to one split for rank-0 validation / `attrlab eval`.

    Calling it gives an eval-mode loader ('__eval__' = this split; full_image=True = the resized,
    uncropped image for test-time crops); `pairs()` streams the split's comparisons from pairs.tsv;
    `embed(which, model)` embeds a whole split with the method's `embed` (jobs/embed.py), in this
    process (workers=0) or on `workers` Ray Data actors (needs `method`, `meta` and a running Ray).
    """

    def __init__(self, cfg: Any, root: str, split: str, *, workers: int = 0, method: str | None = None,
                 meta: Any = None) -> None:
        self.cfg, self.root, self.split = cfg, root, split
        self.workers, self.method, self.meta = workers, method, meta

    def __call__(self, which: str = "__eval__", kind: str = "samples", full_image: bool = False) -> Any:
        aug = self.cfg.data.augment
        if full_image:
            aug = AugmentConfig(resize=aug.resize, size=aug.resize, hflip=False)
        return make_loader(self.root, self.split if which == "__eval__" else which, mode="eval",
                           cfg=self.cfg.data.loader, augment=aug, kind=kind, rank=0, world_size=1)

    def embed(self, which: str, model: torch.nn.Module) -> dict[str, Any]:
        """Sorted-by-key arrays of split `which` ('__eval__' = this split): emb, key, instance,
        category, attributes (see jobs.embed.embed_split)."""
        from jobs.embed import embed_split

        return embed_split(self._method(), model, self.cfg, self.root, self.split if which == "__eval__" else which,
                           workers=self.workers, meta=self.meta)

    def _method(self) -> registry.Method:
        if self.method is not None:
            return registry.get(self.method)
        # built without a method name (eval_loaders): the method whose model config this run uses
        for name in registry.names():
            m = registry.get(name)
            if isinstance(self.cfg.model, m.config_cls):
                return m
        raise ValueError(f"no registered method has model config {type(self.cfg.model).__name__}; "
                         "construct EvalData(..., method=NAME)")

    def pairs(self) -> Iterator[Any]:
        from shards.format import PAIRS_FILE, iter_pairs

        path = Path(self.root) / PAIRS_FILE
        if path.is_file():
            yield from (p for p in iter_pairs(path) if p.split == self.split)


def eval_loaders(cfg: Any, data: str, split: str) -> EvalData:
    return EvalData(cfg, data, split)


def evaluate_rank0(method: registry.Method, model: torch.nn.Module, cfg: Any, data: str, split: str,
                   meta: Any) -> dict[str, float]:
    """Validation runs on rank 0 over the whole split; the result is broadcast to every rank."""
    rank, world = rank_world()
    out: list[Any] = [None]
    if rank == 0:
        model_cfg = cfg.model
        if hasattr(model_cfg, "tta_crops"):  # validation during training: centre crop only, for speed
            model_cfg = dataclasses.replace(model_cfg, tta_crops=1)
        model.eval()
        with torch.no_grad():
            out[0] = method.evaluate(model, eval_loaders(cfg, data, split), model_cfg, meta)
        model.train()
    if world > 1:
        dist.broadcast_object_list(out, src=0)
    return out[0]


def save_snapshot(method: registry.Method, model: torch.nn.Module, cfg: Any, job: TrainJob, meta: Any,
                  step: int) -> None:
    import numpy as np

    model.eval()
    with torch.no_grad():
        arrays = method.snapshot(model, eval_loaders(cfg, job.data, cfg.data.val_split), cfg.model, meta)
    model.train()
    out = Path(job.run_dir) / "snapshots"
    out.mkdir(exist_ok=True)
    np.savez_compressed(out / f"step_{step:07d}.npz", **arrays)


def run_loop(job: TrainJob, reporter: checkpoints.Reporter) -> dict[str, float]:
    from jobs.cli_train import resolve_config_class
    from jobs.config import build

    method = registry.get(job.method)
    cfg = build(resolve_config_class(job.method), job.cfg_dict)
    rank, world = rank_world()
    torch.manual_seed(cfg.seed + rank)
    device = device_for_worker()
    meta = read_meta(Path(job.data))
    if method.prepare_meta is not None:  # e.g. the training instances behind coop_embed's proxies
        meta = method.prepare_meta(meta, Path(job.data), cfg.data.train_split)
        reporter.meta_json = meta.to_json()
    model = method.build(cfg.model, meta).to(device)
    restored = reporter.restore_dir()
    if restored is None and cfg.init.from_run:  # before the engines: DeepSpeed takes the weights as they are
        from jobs.warmstart import warm_start

        copied = warm_start(model, cfg.init, method.name)
        log.info("rank %d: %d tensors from %s (init.from_run)", rank, len(copied), cfg.init.from_run)
    loader = train_loader(method, cfg, job.data)
    micro = loader.dataset.batch_size()
    engines = Engines(model, method.optim_groups(model, cfg.model), cfg.optim, cfg.schedule, cfg.deepspeed, micro)
    start = 0
    if restored is not None:
        engines.load(str(restored))
        start = checkpoints.read_state(restored)["step"]
        log.info("rank %d resumed from %s at step %d", rank, restored, start)
        if restored.name.startswith("attrlab-restore-"):  # this rank's private copy (RayReporter)
            import shutil

            shutil.rmtree(restored, ignore_errors=True)
    info = StepInfo(step=start, max_steps=cfg.schedule.max_steps, device=device,
                    autocast_dtype=autocast_dtype(cfg.deepspeed.precision, device))
    batches = infinite(loader)
    metrics: dict[str, float] = {}
    t0, seen = time.perf_counter(), 0
    ga = cfg.schedule.grad_accum
    step = start
    skipped_here, skipped = 0, 0  # corrupt samples this rank skipped since the last log; all ranks' total
    while step < cfg.schedule.max_steps:
        if step == cfg.checkpoint.fail_at_step and rank == 0 and reporter.inject_fault_once():
            reporter.fail(f"fault injected at step {step} (checkpoint.fail_at_step)")
        lr = engines.set_lr(step)
        info.step, info.logs = step, {}
        losses: dict[str, float] = {}
        for _ in range(ga):
            batch = next(batches)
            seen += micro
            if isinstance(batch.get("skipped"), torch.Tensor):
                skipped_here += int(batch["skipped"].sum())
            out = method.step(engines.module, batch, cfg.model, info)
            for name, loss in out.items():
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: loss {name!r} is {loss.item()}; lower optim.lr or check the data")
                engines.backward(name, loss)
                engines.step(name)
                losses[name] = losses.get(name, 0.0) + float(loss.detach()) / ga
            engines.end_micro_step()
        step += 1
        last = step == cfg.schedule.max_steps
        if step % cfg.schedule.log_every == 0 or last:
            skipped += checkpoints.sum_over_ranks(skipped_here)  # a collective: every rank logs at the same steps
            skipped_here = 0
        if rank == 0 and (step % cfg.schedule.log_every == 0 or last):
            dt = time.perf_counter() - t0
            reporter.log({"step": step, "lr": lr, **{f"loss/{k}": v for k, v in losses.items()}, **info.logs,
                          "samples_per_s": seen * world / max(dt, 1e-9), "data/skipped": skipped})
            t0, seen = time.perf_counter(), 0
        if step % cfg.eval.every_steps == 0 or last:
            metrics = {f"val/{k}": v for k, v in
                       evaluate_rank0(method, engines.module, cfg, job.data, cfg.data.val_split, meta).items()}
            metrics["data/skipped"] = skipped  # corrupt samples skipped by this attempt (since start or resume)
            if rank == 0:
                reporter.log({"step": step, **metrics})
                if method.snapshot is not None:
                    save_snapshot(method, engines.module, cfg, job, meta, step)
        if step % cfg.checkpoint.every_steps == 0 or last:
            reporter.checkpoint(engines, step, {"step": step, **metrics}, cfg, method)
        if step % cfg.eval.every_steps == 0 or step % cfg.checkpoint.every_steps == 0:
            t0, seen = time.perf_counter(), 0  # samples_per_s measures training steps, not validation or saving
    return metrics
