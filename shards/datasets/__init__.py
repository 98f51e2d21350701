"""Embedded datasets, generated from code in seconds with no download.

`attrlab shards build NAME --out DIR [--seed S] [--size PX] [--count N]` looks NAME up in
EMBEDDED (an explicit table) and writes the returned plan.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from shards.format import ShardError
from shards.plan import DatasetPlan


@dataclass(frozen=True)
class BuildOptions:
    seed: int = 0
    size: int | None = None  # image side in px; None = the dataset's default
    count: int | None = None  # number of images; None = the dataset's default
    options: Mapping[str, str] = field(default_factory=dict)  # dataset-specific --opt key=value


# name -> (module, one-line description). Each module defines
#   KNOWN_OPTIONS: tuple[str, ...]   and   plan(opts: BuildOptions) -> DatasetPlan
EMBEDDED: dict[str, tuple[str, str]] = {
    "attrworld": ("shards.datasets.attrworld", "procedural faces: localised + global attributes, identities, categories"),
    "cluttered_digits": ("shards.datasets.cluttered_digits", "scikit-learn digits on cluttered canvases, zero-shot split"),
    "lfw_subset": ("shards.datasets.lfw_subset", "scikit-image's 200 face / non-face photos (real-photo smoke set)"),
}


def knob_number(opts: Mapping[str, str], knobs: Mapping[str, tuple[Any, str]], name: str,
                 cast: Callable[[str], float], lo: float, hi: float) -> Any:
    """`--opt name=value` as int/float within [lo, hi], or the knob's default when absent."""
    raw = opts.get(name)
    if raw is None:
        return knobs[name][0]
    try:
        v = cast(str(raw).strip())
    except ValueError:
        raise ShardError(f"--opt {name}={raw}: expected a {cast.__name__}") from None
    if not (lo <= v <= hi) or not math.isfinite(v):
        raise ShardError(f"--opt {name}={raw}: must be in [{lo}, {hi}]")
    return v


def knob_range(opts: Mapping[str, str], knobs: Mapping[str, tuple[Any, str]], name: str,
               lo: float, hi: float) -> list[float]:
    """`--opt name=min,max` within [lo, hi], or the knob's default when absent."""
    raw = opts.get(name)
    if raw is None:
        return list(knobs[name][0])
    try:
        a, b = (float(x) for x in str(raw).split(","))
    except ValueError:
        raise ShardError(f"--opt {name}={raw}: expected 'min,max'") from None
    if not lo <= a <= b <= hi:
        raise ShardError(f"--opt {name}={raw}: need {lo} <= min <= max <= {hi}")
    return [a, b]


def plan_embedded(name: str, opts: BuildOptions) -> DatasetPlan:
    if name not in EMBEDDED:
        raise ShardError(f"unknown embedded dataset {name!r}; choose one of {', '.join(EMBEDDED)}")
    module = importlib.import_module(EMBEDDED[name][0])
    unknown = set(opts.options) - set(module.KNOWN_OPTIONS)
    if unknown:
        raise ShardError(f"--opt {sorted(unknown)[0]}: not an option of {name}; known: {list(module.KNOWN_OPTIONS)}")
    return module.plan(opts)
