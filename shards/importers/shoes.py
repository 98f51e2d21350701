"""Shoes-with-Attribute (Kovashka, Parikh & Grauman, WhittleSearch, CVPR 2012) -> a shard plan.

Used by the STN ranker paper as a cross-dataset *test* set for models trained on UT-Zap50K-1
(open, pointy and sporty overlap). Layout implemented: the WhittleSearch shoes release
(whittle-search-shoes-dataset-cvpr2012) as read by public code (ALRA's shoes scripts, R and
PyTorch readers of shoes_attributes.mat):

    shoes_attributes.mat
      im_names         1 x 14658 cell of image file names ('img_womens_clogs_123.jpg')
      attribute_names  1 x 10 cell (pointy-at-the-front, open, bright-in-color,
                       covered-with-ornaments, shiny, high-at-the-heel, long-on-the-leg, formal,
                       sporty, feminine); optional, these are the default
      class_names      1 x 10 cell of categories; class_labels: one 1-based category per image
                       (both optional)
      mturk_labels     P x >=4 double, one crowd comparison per row:
                       [image 1, image 2 (1-based into im_names), attribute 1..10, label],
                       label 1 = image 1 shows more, 2 = image 2 shows more, 3 = about equal
    the images, anywhere under --src (flat, or in category folders such as
      womens/womens_clogs/0/img_womens_clogs_123.jpg); found by file name

This layout could only be established from code that reads the file, not from an official
README: the field names and the 1/2/3 label convention are the ones those readers use.
All compared images go to the single split 'test' (the dataset's role in the protocol); only the
images that some pair uses are imported. Attributes are `continuous` without per-image values.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shards.format import ShardError
from shards.importers import ImportOptions
from shards.importers.lfw10 import (RawPair, assign_pair_splits, load_mat, mat_field, mat_str, relative_meta,
                                    sanitise_key, specs_by_split)
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ()
VERSION = 1
ATTRIBUTES = ("pointy-at-the-front", "open", "bright-in-color", "covered-with-ornaments", "shiny",
              "high-at-the-heel", "long-on-the-leg", "formal", "sporty", "feminine")
MAT_FILE = "shoes_attributes.mat"
RELATION = {1: "more", 2: "less", 3: "similar"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _find_mat(src: Path) -> Path:
    for cand in (src / MAT_FILE, *sorted(src.glob(f"*/{MAT_FILE}"))):
        if cand.is_file():
            return safe_join(src, str(cand.relative_to(src)))
    raise ShardError(f"{src / MAT_FILE}: missing; copy shoes_attributes.mat from the WhittleSearch shoes release "
                     f"into --src (or one folder below it)")


def _image_index(src: Path) -> dict[str, str]:
    """file name -> path relative to src, for every image under src (duplicates are an error)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(IMAGE_EXTS):
                rel = os.path.relpath(os.path.join(dirpath, f), src)
                if found.setdefault(f, rel) != rel:
                    raise ShardError(f"{src}: image name {f!r} occurs twice ({found[f]} and {rel}); keep one copy")
    return found


def _cellstr(mat: dict[str, Any], field: str, path: Path) -> list[str]:
    import numpy as np

    return [mat_str(x) for x in np.asarray(mat_field(mat, field, path), dtype=object).flatten()]


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    import numpy as np

    src = Path(src)
    path = _find_mat(src)
    mat = load_mat(path, "copy shoes_attributes.mat from the WhittleSearch shoes release")
    names = _cellstr(mat, "im_names", path)
    attrs = tuple(sanitise_key(a) for a in _cellstr(mat, "attribute_names", path)) if "attribute_names" in mat else ATTRIBUTES
    categories: tuple[str, ...] = ()
    labels = None
    if "class_names" in mat and "class_labels" in mat:
        categories = tuple(_cellstr(mat, "class_names", path))
        labels = np.asarray(mat["class_labels"], dtype=float).flatten()
        if len(labels) != len(names):
            raise ShardError(f"{path}: class_labels has {len(labels)} entries for {len(names)} im_names")
    table = np.asarray(mat_field(mat, "mturk_labels", path), dtype=float)
    if table.ndim != 2 or table.shape[1] < 4:
        raise ShardError(f"{path}: mturk_labels must be P x 4 or wider (got {table.shape})")

    index = _image_index(src)
    base: dict[str, dict[str, Any]] = {}
    key_of: dict[int, str] = {}
    rows: list[RawPair] = []
    for r, row in enumerate(table, start=1):
        where = f"{path}: mturk_labels row {r}"
        if not all(v == int(v) for v in row[:4]):
            raise ShardError(f"{where}: the first four columns must be whole numbers, got {row[:4].tolist()}")
        i, j, a, lab = (int(v) for v in row[:4])
        if not 1 <= a <= len(attrs) or lab not in RELATION:
            raise ShardError(f"{where}: attribute {a} must be in 1..{len(attrs)} and label {lab} in 1..3")
        pair = []
        for n in (i, j):
            if not 1 <= n <= len(names):
                raise ShardError(f"{where}: image {n} is not in 1..{len(names)} (im_names)")
            if n not in key_of:
                name = names[n - 1]
                if Path(name).name != name or "\\" in name or name in ("", ".", ".."):
                    raise ShardError(f"{where}: im_names[{n}] = {name!r} must be a plain file name (no folders)")
                if Path(name).name not in index:
                    raise ShardError(f"{where}: image {name!r} not found under {src}; unpack the shoe images there")
                key = sanitise_key(Path(name).stem)
                if key in base:
                    raise ShardError(f"{where}: key {key!r} repeats for two different images; image names must be unique")
                spec: dict[str, Any] = {"path": str(safe_join(src, index[Path(name).name], what=where)),
                                        "instance": None, "attributes": {}}
                if labels is not None:
                    c = labels[n - 1]
                    if c != int(c) or not 1 <= c <= len(categories):
                        raise ShardError(f"{path}: class_labels[{n}] = {c:g} is not in 1..{len(categories)}")
                    spec["category"] = int(c) - 1
                key_of[n], base[key] = key, spec
            pair.append(key_of[n])
        rows.append((pair[0], pair[1], attrs[a - 1], RELATION[lab]))

    members, pairs, dropped = assign_pair_splits({"test": rows}, "duplicate")
    splits = specs_by_split(members, base, opts.resize)
    meta = relative_meta("shoes", attrs, splits, "Shoes-with-Attribute (WhittleSearch shoes): crowd "
                         "comparisons, a cross-dataset test set", "Kovashka, Parikh & Grauman, CVPR 2012",
                         categories=categories, extra={"pairs_dropped": dropped})
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=pairs,
                       fingerprint=fingerprint_of("shoes", VERSION, opts.resize, sorted(opts.options.items())))
