"""Optimisers for the training loop: DeepSpeed engines (default) or plain data parallel.

One `Engines` object holds one optimiser per name the method declares ({"main"} for most, two
for a GAN). With DeepSpeed each optimiser becomes an engine over the model (a plain torch
optimiser passed in: DeepSpeed's fused optimisers need GPU ops; gloo on CPU, nccl on GPU).
Without DeepSpeed, gradients are all-reduced by hand after backward, which works whatever
sub-module path a method's step takes through the model (DDP only syncs through forward()),
in flat buckets of DDP's default size (one collective per bucket, not one per tensor; DDP also
overlaps its buckets with backward, which this post-backward path does not).

Mixed precision is torch.autocast(bf16) in the method's step with fp32 master weights: the
same numerics with and without DeepSpeed, and no bf16 parameter casting that the methods' uint8
-> float input paths would have to know about.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from jobs.schema import DeepSpeedSection, OptimSection, ScheduleSection
from models.registry import ParamGroup


BUCKET_BYTES = 25 * 2 ** 20  # DDP's default bucket_cap_mb


def allreduce_mean(grads: list[torch.Tensor], world: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average `grads` in place over the process group: consecutive tensors of one dtype and device
    are flattened into buckets of at most `bucket_bytes` (a larger tensor is a bucket of its own)
    and each bucket is one all_reduce."""
    buckets: list[list[torch.Tensor]] = []
    size, key = 0, None
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not buckets or (g.dtype, g.device) != key or size + nbytes > bucket_bytes:
            buckets.append([])
            size, key = 0, (g.dtype, g.device)
        buckets[-1].append(g)
        size += nbytes
    for b in buckets:
        flat = torch.cat([g.reshape(-1) for g in b])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(b, flat.split([g.numel() for g in b])):
            g.copy_(part.view_as(g))


def lr_factor(step: int, s: ScheduleSection) -> float:
    """Multiplier of the base lr at optimiser step `step` (warm-up, then the schedule)."""
    if s.warmup_steps and step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.kind == "cosine":
        t = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if s.kind == "step":
        return s.gamma ** (step // s.step_every)
    return 1.0


def make_optimizer(groups: list[ParamGroup], o: OptimSection) -> torch.optim.Optimizer:
    pg = []
    for g in groups:
        mult = g.lr_mult * o.lr_mult.get(g.name, 1.0)
        pg.append({"params": g.params, "lr": o.lr * mult, "base_lr": o.lr * mult, "name": g.name,
                   "weight_decay": o.weight_decay if g.weight_decay is None else g.weight_decay})
    if o.name == "sgd":
        return torch.optim.SGD(pg, lr=o.lr, momentum=o.momentum)
    if o.name == "adam":
        return torch.optim.Adam(pg, lr=o.lr, betas=o.betas)
    return torch.optim.AdamW(pg, lr=o.lr, betas=o.betas)


def deepspeed_config(ds: DeepSpeedSection, micro_batch: int, sched: ScheduleSection, o: OptimSection) -> dict[str, Any]:
    import json
    from pathlib import Path

    from shards.format import ShardError

    cfg: dict[str, Any] = {}
    if ds.config_file:
        p = Path(ds.config_file)
        if not p.is_file():
            raise ShardError(f"deepspeed.config_file {p}: not found")
        cfg = json.loads(p.read_text())
    cfg.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": sched.grad_accum,
        "zero_optimization": {**cfg.get("zero_optimization", {}), "stage": ds.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
    if o.grad_clip > 0:
        cfg["gradient_clipping"] = o.grad_clip
    cfg.pop("bf16", None), cfg.pop("fp16", None)  # precision is autocast in the step (module docstring)
    return cfg


class Engines:
    """named optimisers with backward/step, lr schedule, grad accumulation, save/load."""

    def __init__(self, model: nn.Module, groups: Mapping[str, list[ParamGroup]], o: OptimSection,
                 sched: ScheduleSection, ds: DeepSpeedSection, micro_batch: int) -> None:
        self.model, self.sched, self.o = model, sched, o
        self.use_ds = ds.enabled
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.engines: dict[str, Any] = {}
        self.micro = 0
        for name, gs in groups.items():
            opt = make_optimizer(gs, o)
            self.optimizers[name] = opt
            if self.use_ds:
                import deepspeed  # inside the worker: DeepSpeed initialises accelerator state on import

                eng, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, dist_init_required=False,
                                                         config=deepspeed_config(ds, micro_batch, sched, o))
                self.engines[name] = eng
                self.optimizers[name] = ds_opt

    @property
    def module(self) -> nn.Module:
        return self.model

    def set_lr(self, step: int) -> float:
        f = lr_factor(step, self.sched)
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = g.get("base_lr", self.o.lr) * f
        return self.o.lr * f

    def backward(self, name: str, loss: torch.Tensor) -> None:
        if self.use_ds:
            self.engines[name].backward(loss)
        else:
            (loss / self.sched.grad_accum).backward()

    def step(self, name: str) -> bool:
        """Step optimiser `name`; True when this micro-step ended an accumulation window."""
        if self.use_ds:
            eng = self.engines[name]
            boundary = eng.is_gradient_accumulation_boundary()
            eng.step()
            return boundary
        boundary = (self.micro + 1) % self.sched.grad_accum == 0
        if boundary:
            params = [p for g in self.optimizers[name].param_groups for p in g["params"] if p.grad is not None]
            if self.world > 1:  # plain data parallel: average gradients over ranks
                allreduce_mean([p.grad for p in params], self.world)
            if self.o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, self.o.grad_clip)
            self.optimizers[name].step()
            self.optimizers[name].zero_grad(set_to_none=True)
        return boundary

    def end_micro_step(self) -> None:
        self.micro += 1

    # -- state ----------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Every rank calls this (DeepSpeed checkpoints are collective)."""
        import os

        if self.use_ds:
            for name, eng in self.engines.items():
                eng.save_checkpoint(directory, tag=f"ds_{name}")
        elif not dist.is_initialized() or dist.get_rank() == 0:
            state = {"model": self.model.state_dict(),
                     "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()}}
            torch.save(state, os.path.join(directory, "trainer.pt"))

    def load(self, directory: str) -> None:
        import os

        if self.use_ds:
            for name, eng in self.engines.items():
                check_pickles(os.path.join(directory, f"ds_{name}"))
                eng.load_checkpoint(directory, tag=f"ds_{name}")
            return
        state = torch.load(os.path.join(directory, "trainer.pt"), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        for n, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][n])


# What DeepSpeed's own checkpoint files may reference beyond tensors and builtins (ZeRO 0-3, fp32 /
# bf16 / fp16 here): DeepSpeed loads them with torch.load(weights_only=False), which would run any
# other pickled callable, so a tampered run directory is refused before DeepSpeed opens it.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
})


def check_pickles(directory: str) -> None:
    """Refuse a DeepSpeed checkpoint whose pickles name anything outside DEEPSPEED_GLOBALS
    (read without unpickling: torch.serialization.get_unsafe_globals_in_checkpoint)."""
    from pathlib import Path

    from shards.format import ShardError

    for f in sorted(Path(directory).glob("*.pt")):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as e:  # noqa: BLE001 — torch raises ValueError / RuntimeError / UnpicklingError on a damaged file
            raise ShardError(f"{f}: not a readable checkpoint ({type(e).__name__}); delete its checkpoint directory "
                             f"({Path(directory).parent}) to resume from the one before it") from None
        bad = sorted(set(found) - DEEPSPEED_GLOBALS)
        if bad:
            raise ShardError(f"{f}: refusing to load a checkpoint that references {', '.join(bad[:3])}; "
                             "it was not written by attrlab (or was modified): train into a new --out")
