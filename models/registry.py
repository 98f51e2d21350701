"""The explicit method registry: name -> Method (config class, build, optimiser groups, step,
evaluation). One training loop (jobs/train.py) drives every method through this interface.

A step returns named losses per optimiser ({"main": loss} for one optimiser; {"ranker": ...,
"generator": ...} for a GAN's alternating updates), so the same loop serves all five methods.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, TypeVar

import torch
from torch import nn

from shards.format import DatasetMeta


@dataclass
class StepInfo:
    """What a step may need besides the batch."""

    step: int  # global optimiser step (0-based)
    max_steps: int
    device: torch.device
    autocast_dtype: torch.dtype | None = None  # bf16 where the device supports it, else None
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars to report (detached floats)


@dataclass(frozen=True)
class ParamGroup:
    """A named set of parameters with a learning-rate multiplier (per-parameter-group lrs)."""

    name: str
    params: list[nn.Parameter]
    lr_mult: float = 1.0
    weight_decay: float | None = None  # None = the optimiser's


# Evaluation gets jobs.train.EvalData: calling it gives an eval-mode loader of the evaluated split
# (`loaders("__eval__", kind="samples"|"pairs", full_image=bool)`); `loaders.pairs()` streams
# that split's comparisons from pairs.tsv.
LoaderFactory = Any


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type  # the frozen dataclass of the `model:` config section
    data_kind: Literal["pairs", "samples", "class_balanced"]
    build: Callable[[Any, DatasetMeta], nn.Module]
    # optimiser name -> its parameter groups; one optimiser -> {"main": [...]}
    optim_groups: Callable[[nn.Module, Any], Mapping[str, list[ParamGroup]]]
    step: Callable[[nn.Module, dict[str, Any], Any, StepInfo], Mapping[str, torch.Tensor]]
    evaluate: Callable[[nn.Module, LoaderFactory, Any, DatasetMeta], dict[str, float]]
    val_metric: str  # higher is better; selects the reported best checkpoint
    describe: str = ""
    # optional: arrays recorded at every validation (rank 0), saved as RUN_DIR/snapshots/step_N.npz
    # (e.g. stn_ranker's crop boxes on validation images, for the box-distribution figure)
    snapshot: Callable[[nn.Module, LoaderFactory, Any, DatasetMeta], dict[str, Any]] | None = None
    # optional: the paper's figures for `attrlab report`: (model, loaders, cfg, meta, run_dir, out_dir)
    # -> list of (caption, png path relative to out_dir)
    figures: Callable[..., list[tuple[str, str]]] | None = None
    # optional: (dataset meta, shard dir, train split) -> meta with what `build` needs from the
    # training data (e.g. coop_embed's instance list); the result is exported with the model
    prepare_meta: Callable[[DatasetMeta, Path, str], DatasetMeta] | None = None
    # optional: (model, uint8 images [B, 3, H, W]) -> embeddings [B, D] (index, serving)
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    # optional: (model, jobs.embed arrays of the term split) -> named arrays saved with the index as
    # terms.npz (coop_embed: attribute-value and category query terms, served by /v1/search)
    query_terms: Callable[[nn.Module, dict[str, Any]], dict[str, Any]] | None = None
    # `model:` fields holding local paths: made absolute at submission, so Ray workers (whose
    # working directory differs) read the same file
    path_fields: tuple[str, ...] = ()


def autocast(info: StepInfo) -> contextlib.AbstractContextManager:
    """torch.autocast at the step's dtype (bf16 where supported), or nothing."""
    if info.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(info.device.type, dtype=info.autocast_dtype)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """The module in eval mode for the block; its previous mode restored after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """The module's parameters out of the autograd graph for the block (inputs still get
    gradients): a GAN phase's loss through the other network leaves that network's .grad alone,
    so each named optimiser of a step only ever sees its own gradients."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


M = TypeVar("M", bound=nn.Module)


def unwrap(model: nn.Module, cls: type[M]) -> M:
    """The `cls` module inside DDP / DeepSpeed wrappers (or the model itself)."""
    while not isinstance(model, cls) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(model).__name__}")
    return model


def scalar_attributes(meta: DatasetMeta, names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...], list[int]]:
    """(names, kinds, meta columns) of the named continuous / binary attributes, or of all of them
    when `names` is empty; an unknown or categorical name is one error naming the choices."""
    from shards.format import ShardError

    usable = [a.name for a in meta.attributes if a.kind in ("continuous", "binary")]
    for name in names:
        if name not in usable:
            raise ShardError(f"model.attributes: {name!r} is not a continuous or binary attribute of dataset "
                             f"{meta.name!r}; choose from {usable}")
    chosen = tuple(names) or tuple(usable)
    if not chosen:
        raise ShardError(f"dataset {meta.name!r} has no continuous or binary attribute")
    return chosen, tuple(meta.attribute(n).kind for n in chosen), [meta.attribute_names.index(n) for n in chosen]


def lazy_figures(module: str) -> Callable[..., list[tuple[str, str]]]:
    """A `figures` hook that imports `module` (and so matplotlib) only when a report is drawn."""
    def figures(*args: Any) -> list[tuple[str, str]]:
        import importlib

        return importlib.import_module(module).figures(*args)

    return figures


def _stn_ranker() -> Method:
    from models import stn_ranker

    return stn_ranker.METHOD


def _coop_embed() -> Method:
    from models import coop_embed

    return coop_embed.METHOD


def _deml() -> Method:
    from models import deml

    return deml.METHOD


def _trip() -> Method:
    from models import trip

    return trip.METHOD


def _latent_retrieval() -> Method:
    from models import latent_retrieval

    return latent_retrieval.METHOD


def _attr_oracle() -> Method:
    from models import attr_oracle

    return attr_oracle.METHOD


# name -> loader of its Method (imported lazily so one method's dependencies never load another's)
REGISTRY: dict[str, Callable[[], Method]] = {
    "stn_ranker": _stn_ranker,
    "coop_embed": _coop_embed,
    "deml": _deml,
    "latent_retrieval": _latent_retrieval,
    "trip": _trip,
    # not one of the five methods: the attribute regressor trip (and later latent_retrieval) is
    # judged by, trained on real images through the same spine
    "attr_oracle": _attr_oracle,
}


def get(name: str) -> Method:
    from shards.format import ShardError

    if name not in REGISTRY:
        raise ShardError(f"unknown method {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def names() -> Iterator[str]:
    return iter(REGISTRY)
