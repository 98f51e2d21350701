"""The shared config sections every method's run config carries, plus its own `model:` section.

`jobs/configs/<method>.yaml` fills them; `attrlab train ... --set a.b=c` overrides any key.
The resolved config is saved in the run directory with the shards' manifest checksum.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from shards.augment import AugmentConfig
from shards.reader import LoaderConfig


@dataclass(frozen=True)
class DataSection:
    path: str = ""  # shard directory (the --data flag overrides)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class OptimSection:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 5e-4
    lr_mult: dict[str, float] = field(default_factory=dict)  # param-group name -> extra lr multiplier
    grad_clip: float = 0.0  # max global grad norm; 0 = off

    def __post_init__(self) -> None:
        if not self.lr >= 0:  # 0 is allowed: an untrained baseline that only calibrates BatchNorm statistics
            raise ValueError(f"optim.lr must be >= 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.momentum < 1:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0, optim.momentum in [0, 1)")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must each be in [0, 1), got {list(self.betas)}")
        bad = {k: v for k, v in self.lr_mult.items() if not v >= 0}
        if bad:
            raise ValueError(f"optim.lr_mult: multipliers must be >= 0 (0 freezes a group), got {bad}")


@dataclass(frozen=True)
class ScheduleSection:
    max_steps: int = 1000
    kind: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0
    step_every: int = 1000  # kind=step: multiply the lr by gamma every step_every steps
    gamma: float = 0.1
    grad_accum: int = 1
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.grad_accum < 1:
            raise ValueError("schedule.max_steps and schedule.grad_accum must be >= 1")
        if self.warmup_steps < 0 or self.step_every < 1 or self.log_every < 1 or not self.gamma > 0:
            raise ValueError("schedule.warmup_steps must be >= 0, schedule.step_every and schedule.log_every >= 1, "
                             "schedule.gamma > 0")


@dataclass(frozen=True)
class ScalingSection:
    workers: int = 2
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    storage_path: str = ""  # shared filesystem path or object-store URI for multi-node runs
    # Ray placement of the workers: PACK fills a node first; SPREAD / STRICT_SPREAD one per node
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def __post_init__(self) -> None:
        if self.workers < 1 or self.gpus_per_worker < 0 or not self.cpus_per_worker > 0:
            raise ValueError(f"scaling.workers must be >= 1 (got {self.workers}), scaling.gpus_per_worker >= 0 "
                             f"(got {self.gpus_per_worker}), scaling.cpus_per_worker > 0 (got {self.cpus_per_worker})")


@dataclass(frozen=True)
class DeepSpeedSection:
    enabled: bool = True
    zero_stage: int = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where supported, else fp32
    config_file: str = ""  # a DeepSpeed JSON (cluster/deepspeed/*.json) our keys are merged over


@dataclass(frozen=True)
class CheckpointSection:
    every_steps: int = 200
    keep: int = 2
    max_failures: int = 1
    fail_at_step: int = -1  # fault injection (tests, drills): rank 0 dies once at this step (a Ray worker: SIGKILL)
    min_free_mb: float = 0.0  # refuse a checkpoint that would leave less free space than this on its storage

    def __post_init__(self) -> None:
        if self.every_steps < 1 or self.keep < 0 or self.max_failures < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 1 (got {self.every_steps}), checkpoint.keep and "
                             "checkpoint.max_failures >= 0")


@dataclass(frozen=True)
class EvalSection:
    every_steps: int = 200
    max_batches: int = 0  # kept so saved run configs still load: only 0 (the whole split) is supported

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ValueError(f"eval.every_steps must be >= 1, got {self.every_steps}")
        if self.max_batches != 0:  # was accepted and ignored; now a clear error instead of a silent no-op
            raise ValueError(f"max_batches: {self.max_batches} is not supported: validation runs over the whole "
                             "split (retrieval metrics need every gallery item); set 0, or validate on a smaller "
                             "split (data.val_split)")


@dataclass(frozen=True)
class TrackingSection:
    """MLflow experiment tracking (jobs/tracking.py); ATTRLAB_TRACKING=0 turns it off everywhere."""

    enabled: bool = True
    # "" = $MLFLOW_TRACKING_URI, else a local store: sqlite:///RUN_DIR/mlflow.db (a sweep: SWEEP_DIR/mlflow.db).
    # Multi-node runs need a store every node reaches (an MLflow server URI, or a shared-filesystem path).
    uri: str = ""
    experiment: str = ""  # "" = the method name (a sweep: the sweep directory's name)


@dataclass(frozen=True)
class InitSection:
    """Warm start from another run of the same method (jobs/warmstart.py); acts once, at step 0."""

    # a run directory (its latest export) or an export directory, read by every worker (multi-node:
    # a shared filesystem path); "" = the method's own init
    from_run: str = ""
    include: tuple[str, ...] = ()  # parameter-name prefixes to copy (e.g. [localiser.]); () = all
    exclude: tuple[str, ...] = ()  # prefixes not to copy


SHARED_SECTIONS: dict[str, type] = {
    "data": DataSection, "optim": OptimSection, "schedule": ScheduleSection, "scaling": ScalingSection,
    "deepspeed": DeepSpeedSection, "checkpoint": CheckpointSection, "eval": EvalSection,
    "tracking": TrackingSection, "init": InitSection,
}


def run_config_class(method: str, model_cls: type) -> type:
    """A frozen dataclass `<Method>RunConfig` with the shared sections, `seed` and `model`."""
    fields: list[Any] = [(name, tp, field(default_factory=tp)) for name, tp in SHARED_SECTIONS.items()]
    fields += [("model", model_cls, field(default_factory=model_cls)), ("seed", int, field(default=0))]
    cls_name = "".join(p.title() for p in method.split("_")) + "RunConfig"
    cls = dataclasses.make_dataclass(cls_name, fields, frozen=True)
    cls.__module__ = __name__
    return cls
