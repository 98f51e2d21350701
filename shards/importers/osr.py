"""OSR outdoor scenes with relative attributes (Parikh & Grauman, ICCV 2011) -> a shard plan.

Layout implemented (the authors' relative_attributes release, osr/ part, read the same way by the
public OSR dataset helpers of relative-attribute ranking code):

    data.mat     im_names           2688 x 1 cell of file names ('coast_arnat59.jpg')
                 class_labels       2688 x 1, category 1..8 of each image
                 used_for_training  2688 x 1, 1 = train image (30 per category), 0 = test
                 relative_ordering  6 x 8, the rank of each category for each attribute
                                    (larger = more of the attribute)
                 attribute_names    1 x 6 cell (natural, open, perspective, size-large,
                                    diagonal-plane, depth-close); optional, these are the default
                 class_names        1 x 8 cell; optional
    spatial_envelope_256x256_static_8outdoorcategories/   the 2688 images (--opt images=DIR)

Labels are category-level orderings, so each image carries a real per-image value: its category's
rank, rescaled to [0, 1] per attribute ((rank - min) / (max - min)); kind `continuous`. Pairs
follow from the values (higher rank -> 'more', equal rank -> 'similar'):
  --opt pairs=sample (default)  up to --opt max_pairs=N (default 2000) pairs per attribute and
                                split, drawn deterministically from the seed
  --opt pairs=all               every unordered pair of a split (millions for test)
  --opt pairs=none              values only
Splits: train/test from used_for_training; val carved from the train images (val_fraction, seed).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from shards.format import Pair, ShardError, pairs_from_values
from shards.importers import ImportOptions
from shards.importers.lfw10 import (carve, dataset_root, int_opt, load_mat, mat_field, mat_str, relative_meta,
                                    sanitise_key)
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ("images", "pairs", "max_pairs")
VERSION = 1
ATTRIBUTES = ("natural", "open", "perspective", "size-large", "diagonal-plane", "depth-close")
IMAGE_DIR = "spatial_envelope_256x256_static_8outdoorcategories"


def _names(mat: dict[str, Any], field: str, n: int, default: tuple[str, ...], path: Path) -> tuple[str, ...]:
    import numpy as np

    if field not in mat:
        if len(default) != n:
            raise ShardError(f"{path}: no {field!r} and {n} entries expected; add the field to the file")
        return default
    names = tuple(sanitise_key(mat_str(x)) for x in np.asarray(mat[field], dtype=object).flatten())
    if len(names) != n:
        raise ShardError(f"{path}: {field} has {len(names)} entries, expected {n}")
    return names


def relation_pairs(keys: list[str], values: list[float], attr: str, split: str, mode: str, max_pairs: int,
                   seed: int) -> list[Pair]:
    """Pairs from per-image ordinal values: 'all' enumerates, 'sample' draws up to max_pairs."""
    if mode == "all" or (mode == "sample" and max_pairs >= len(keys) * (len(keys) - 1) // 2):
        return [Pair(keys[i], keys[j], attr, "more" if values[i] > values[j] else "less" if values[i] < values[j]
                     else "similar", split) for i, j in itertools.combinations(range(len(keys)), 2)]
    if mode == "sample":
        return pairs_from_values(keys, list(values), attr, split, tau=1e-9, tau_sim=1e-9,
                                 max_pairs=max_pairs, seed=seed)
    return []


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    import numpy as np

    root = dataset_root(Path(src), "data.mat", ("osr", "relative_attributes/osr"))
    path = root / "data.mat"
    mat = load_mat(path, "copy osr/data.mat from Parikh & Grauman's relative attributes release into --src")
    mode = opts.opt("pairs", "sample", ("sample", "all", "none"))
    max_pairs = int_opt(opts, "max_pairs", 2000, 1, 10**9)
    images = safe_join(root, opts.options.get("images", IMAGE_DIR))
    if not images.is_dir():
        raise ShardError(f"{images}: missing; unpack the OSR images there or name the folder with --opt images=DIR")

    names = [mat_str(x) for x in np.asarray(mat_field(mat, "im_names", path), dtype=object).flatten()]
    labels = np.asarray(mat_field(mat, "class_labels", path), dtype=float).flatten()
    training = np.asarray(mat_field(mat, "used_for_training", path), dtype=float).flatten()
    ordering = np.asarray(mat_field(mat, "relative_ordering", path), dtype=float)
    if not len(names) == len(labels) == len(training):
        raise ShardError(f"{path}: im_names ({len(names)}), class_labels ({len(labels)}) and used_for_training "
                         f"({len(training)}) must have one entry per image")
    if ordering.ndim != 2:
        raise ShardError(f"{path}: relative_ordering must be attributes x categories (got {ordering.shape})")
    attrs = _names(mat, "attribute_names", ordering.shape[0], ATTRIBUTES, path)
    categories = _names(mat, "class_names", ordering.shape[1], tuple(f"class{i + 1}" for i in range(ordering.shape[1])), path)
    span = ordering.max(axis=1) - ordering.min(axis=1)
    scaled = (ordering - ordering.min(axis=1, keepdims=True)) / np.where(span > 0, span, 1)[:, None]

    base: dict[str, dict[str, Any]] = {}
    split_keys: dict[str, list[str]] = {"train": [], "test": []}
    for i, (name, lab, tr) in enumerate(zip(names, labels, training)):
        where = f"{path}: image {i + 1} ({name!r})"
        if lab != int(lab) or not 1 <= lab <= len(categories):
            raise ShardError(f"{where}: class label {lab:g} is not in 1..{len(categories)}")
        img = safe_join(images, name, what=where)
        if not img.is_file():
            raise ShardError(f"{where}: image not found under {images}")
        key = sanitise_key(Path(name).stem)
        if key in base:
            raise ShardError(f"{where}: key {key!r} repeats an earlier image name; image names must be unique")
        c = int(lab) - 1
        base[key] = {"path": str(img), "instance": None, "category": c,
                     "attributes": {a: float(scaled[k, c]) for k, a in enumerate(attrs)}}
        split_keys["train" if tr else "test"].append(key)
    split_keys["train"], split_keys["val"] = carve(split_keys["train"], opts.val_fraction, opts.seed, "osr")

    splits = {s: [dict(base[k], key=k, split=s, resize=opts.resize) for k in sorted(keys)]
              for s, keys in split_keys.items() if keys}
    pairs: list[Pair] = []
    for split, specs in splits.items():
        keys = [s["key"] for s in specs]
        for attr in attrs:
            pairs += relation_pairs(keys, [base[k]["attributes"][attr] for k in keys], attr, split, mode,
                                    max_pairs, opts.seed)
    meta = relative_meta("osr", attrs, splits, "OSR: 2688 outdoor scenes, 8 categories, 6 relative attributes "
                         "(category-level orderings)", "Parikh & Grauman, ICCV 2011 (relative attributes)",
                         categories=categories, extra={"pairs": mode, "max_pairs": max_pairs,
                                                       "values": "category rank rescaled to [0, 1]"},
                         attr_note="category-level rank rescaled to [0, 1] (relative attribute)")
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=pairs,
                       fingerprint=fingerprint_of("osr", VERSION, opts.resize, opts.seed, opts.val_fraction,
                                                  sorted(opts.options.items())))
