"""Warm start (`init:` section): copy parameters from another run's serving export into a fresh
model before step 0.

This is how a user fine-tunes, and how attrlab does what the papers do with ImageNet weights
when no such weights exist: start a network, or part of it, from one attrlab already trained.
An example is the stn_ranker localiser of an attribute whose region it found, used for a
neighbouring small region (docs/RESULTS.md). Only the export's safetensors are read, never
pickled state. A run resumed from its own checkpoint loads that checkpoint over these weights,
so `init` acts once, at the run's start.

    init: {from_run: runs/beard, include: [localiser.]}     # YAML
    --set init.from_run=runs/beard --set 'init.include=[localiser.]'

`include` / `exclude` are parameter-name prefixes (`model.state_dict()` names). Tensors are
copied by name and must have the same shape. A model of another method, a prefix matching
nothing, a name the new model lacks, or a shape that differs is an error naming the key.
Per-attribute rows (an STN head, a scorer) are copied by position, so a one-attribute model
seeds another one-attribute model whatever the attribute is called.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shards.format import ShardError


def export_dir(path: Path) -> Path:
    """An export directory itself, or a run directory's latest export."""
    from jobs.checkpoints import latest_export

    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    if not path.is_dir():
        raise ShardError(f"init.from_run {path}: no such run or export directory")
    try:
        return latest_export(path)
    except ShardError:
        raise ShardError(f"init.from_run {path}: no finished checkpoint with an export; point it at a trained "
                         "run directory (or a checkpoint's export/)") from None


def _method_of(export: Path) -> str:
    from jobs.checkpoints import read_state

    try:
        return str(read_state(export.parent)["method"])
    except (OSError, KeyError, ValueError):
        raise ShardError(f"init.from_run {export}: no state.json next to it naming its method; point at a run "
                         "directory or a checkpoint's export/ directory") from None


def _selected(names: list[str], include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    return [n for n in names if (not include or n.startswith(include)) and not n.startswith(exclude)]


def plan(model: torch.nn.Module, section: Any, method: str) -> tuple[Path, list[str]]:
    """Check `init` against `model` (which may live on the meta device) without copying:
    (export directory, the parameter names to copy). Raises ShardError naming the key."""
    from safetensors import safe_open

    export = export_dir(Path(section.from_run))
    source = _method_of(export)
    if source != method:
        raise ShardError(f"init.from_run {section.from_run}: holds a {source} model, this run trains {method}; "
                         f"warm starts copy weights between runs of one method")
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for prefix in (*section.include, *section.exclude):
        if not any(k.startswith(prefix) for k in shapes):
            roots = sorted({k.split(".")[0] for k in shapes})
            raise ShardError(f"init: prefix {prefix!r} matches no parameter of {export}; its modules: {roots}")
    names = _selected(sorted(shapes), tuple(section.include), tuple(section.exclude))
    if not names:
        raise ShardError(f"init: include {list(section.include)} minus exclude {list(section.exclude)} selects nothing")
    for k in names:
        if k not in target:
            raise ShardError(f"init: {k!r} of {export} is not in the new {method} model; narrow init.include "
                             "(or init.exclude it)")
        if shapes[k] != target[k]:
            raise ShardError(f"init: {k!r} is {list(shapes[k])} in {export} but {list(target[k])} in the new model "
                             "(different attributes or sizes); exclude it with init.exclude")
    return export, names


def warm_start(model: torch.nn.Module, section: Any, method: str) -> list[str]:
    """Copy the selected tensors of `section.from_run`'s export into `model` in place; returns their names."""
    from safetensors import safe_open

    export, names = plan(model, section, method)
    with torch.no_grad(), safe_open(str(export / "model.safetensors"), "pt") as f:
        current = model.state_dict()
        for k in names:  # only the selected tensors are read (a localiser, not a whole AlexNet)
            current[k].copy_(f.get_tensor(k).to(current[k].dtype))
    return names
