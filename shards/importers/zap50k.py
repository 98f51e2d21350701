"""UT-Zap50K-1 coarse relative attributes of shoes (Yu & Grauman, CVPR 2014) -> a shard plan.

Layout implemented (the UT-Zap50K release; read the same way by the public Zappos50K1 helpers
that load `mturkOrder` with `trainIndexAll`/`testIndexAll`, and by torch loaders of
`image-path.mat`):

    ut-zap50k-data/
      image-path.mat         imagepath: 50025 x 1 cell of relative image paths,
                             'Shoes/Oxfords/Bostonian/100627.72.jpg'; image i (1-based) is row i
      zappos-labels.mat      mturkOrder: 1 x 4 cell (open, pointy, sporty, comfort); each M x 6
                             double [img1, img2, attribute 1..4, winner, confidence, agreement],
                             winner 1 = img1 shows more, 2 = img2 shows more, 3 = equal
      train-test-splits.mat  trainIndexAll / testIndexAll: 1 x 4 cell (per attribute) of 1 x 10
                             cells (the 10 random splits) of 1-based row indices into mturkOrder
    ut-zap50k-images-square/ or ut-zap50k-images/   the images, at the paths of image-path.mat

`--opt split_index=1..10` picks one of the ten published train/test splits (default 1);
`--opt images=DIR` names the image folder (default: the first of the two above that exists).
Some unpacked copies end folder names with '%2E' (or drop the period) where image-path.mat has a
trailing '.'; both spellings are accepted.

Keys are 'img_NNNNN' (the 1-based row in image-path.mat); category = the top-level folder
(Boots, Sandals, Shoes, Slippers); instance = the file stem (product and colour id). Attributes
are `continuous` with no per-image values: the labels are the pairs. val is carved from each
attribute's train pairs; images shared between splits follow `--opt overlap=` (see lfw10).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.format import ShardError
from shards.importers import ImportOptions
from shards.importers.lfw10 import (RawPair, assign_pair_splits, carve, dataset_root, int_opt, load_mat,
                                    mat_field, mat_str, overlap_policy, relative_meta, specs_by_split)
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ("split_index", "images", "overlap")
VERSION = 1
ATTRIBUTES = ("open", "pointy", "sporty", "comfort")
IMAGE_DIRS = ("ut-zap50k-images-square", "ut-zap50k-images")
RELATION = {1: "more", 2: "less", 3: "similar"}


def _cell(value: Any, n: int, path: Path, name: str) -> list[Any]:
    import numpy as np

    flat = np.asarray(value, dtype=object).flatten()
    if len(flat) < n:
        raise ShardError(f"{path}: {name} has {len(flat)} entries, expected {n}; re-download the file")
    return list(flat)


def _image_path(images: Path, rel: str, where: str) -> Path:
    """The image file for an image-path.mat entry, accepting the '%2E'/dropped-period spellings."""
    parts = rel.replace("\\", "/").split("/")
    candidates = [parts]
    if any(p.endswith(".") for p in parts[:-1]):
        candidates.append([p[:-1] + "%2E" if p.endswith(".") else p for p in parts[:-1]] + parts[-1:])
        candidates.append([p.rstrip(".") for p in parts[:-1]] + parts[-1:])
    for cand in candidates:
        path = safe_join(images, "/".join(cand), what=where)
        if path.is_file():
            return path
    raise ShardError(f"{where}: image {rel!r} not found under {images}; unpack the image archive there "
                     f"or point --opt images= at it")


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    import numpy as np

    root = dataset_root(Path(src), "ut-zap50k-data", ("ut-zap50k", "UT-Zap50K"))
    data = root / "ut-zap50k-data"
    split_index = int_opt(opts, "split_index", 1, 1, 10)
    policy = overlap_policy(opts)
    img_opt = opts.options.get("images")
    images = safe_join(root, img_opt or next((d for d in IMAGE_DIRS if (root / d).is_dir()), IMAGE_DIRS[0]),
                       "--opt images (the image folder)" if img_opt else "image folder")
    if not images.is_dir():
        raise ShardError(f"{root}: no image folder ({img_opt or ' or '.join(IMAGE_DIRS)}); unpack the "
                         f"UT-Zap50K images there or name the folder with --opt images=DIR")

    p_paths, p_labels, p_splits = data / "image-path.mat", data / "zappos-labels.mat", data / "train-test-splits.mat"
    hint = "copy ut-zap50k-data/ from the UT-Zap50K release into --src"
    imagepath = [mat_str(x) for x in np.asarray(mat_field(load_mat(p_paths, hint), "imagepath", p_paths),
                                                   dtype=object).flatten()]
    orders = _cell(mat_field(load_mat(p_labels, hint), "mturkOrder", p_labels), 4, p_labels, "mturkOrder")
    split_mat = load_mat(p_splits, hint)
    train_idx = _cell(mat_field(split_mat, "trainIndexAll", p_splits), 4, p_splits, "trainIndexAll")
    test_idx = _cell(mat_field(split_mat, "testIndexAll", p_splits), 4, p_splits, "testIndexAll")

    used: dict[int, str] = {}  # 0-based image index -> key

    def key_of(num: float, where: str) -> str:
        i = int(num) - 1
        if num != int(num) or not 0 <= i < len(imagepath):
            raise ShardError(f"{where}: image index {num!r} is not in 1..{len(imagepath)} of {p_paths.name}; "
                             f"the label and path files come from different releases")
        return used.setdefault(i, f"img_{i + 1:05d}")

    raw: dict[str, list[RawPair]] = {"train": [], "val": [], "test": []}
    for a, attr in enumerate(ATTRIBUTES):
        table = np.asarray(orders[a], dtype=float)
        if table.ndim != 2 or table.shape[1] < 4:
            raise ShardError(f"{p_labels}: mturkOrder{{{a + 1}}} must be M x 6 (got {table.shape})")
        for split, cells in (("train", train_idx), ("test", test_idx)):
            per_split = _cell(cells[a], 10, p_splits, f"{'trainIndexAll' if split == 'train' else 'testIndexAll'}{{{a + 1}}}")
            rows: list[RawPair] = []
            for row_no in np.asarray(per_split[split_index - 1], dtype=float).flatten():
                where = f"{p_splits}: {split} split {split_index} of {attr!r}, row {row_no:g}"
                if row_no != int(row_no) or not 1 <= row_no <= len(table):
                    raise ShardError(f"{where}: not a row of mturkOrder{{{a + 1}}} (1..{len(table)}) in {p_labels}")
                r = table[int(row_no) - 1]
                rel = RELATION.get(int(r[3])) if r[3] == int(r[3]) else None
                if rel is None:
                    raise ShardError(f"{p_labels}: mturkOrder{{{a + 1}}} row {int(row_no)}: winner {r[3]:g} is not 1, 2 or 3")
                rows.append((key_of(r[0], where), key_of(r[1], where), attr, rel))
            if split == "train":
                rows, held = carve(rows, opts.val_fraction, opts.seed, f"zap50k/{split_index}/{attr}")
                raw["val"].extend(held)
            raw[split].extend(rows)

    members, pairs, dropped = assign_pair_splits({s: r for s, r in raw.items() if r}, policy)
    categories = sorted({imagepath[i].replace("\\", "/").split("/")[0] for i in used})
    base: dict[str, dict[str, Any]] = {}
    for i, key in used.items():
        path = _image_path(images, imagepath[i], f"{p_paths}: entry {i + 1}")
        rel = imagepath[i].replace("\\", "/")
        base[key] = {"path": str(path), "instance": Path(rel).stem, "attributes": {},
                     "category": categories.index(rel.split("/")[0]), "extra": {"path": rel}}
    splits = specs_by_split(members, base, opts.resize)
    meta = relative_meta("zap50k", ATTRIBUTES, splits, f"UT-Zap50K-1 coarse comparisons, published split "
                         f"{split_index} of 10", "Yu & Grauman, CVPR 2014 (UT-Zap50K)", categories=categories,
                         extra={"split_index": split_index, "overlap": policy, "pairs_dropped": dropped})
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=pairs,
                       fingerprint=fingerprint_of("zap50k", VERSION, opts.resize, opts.seed, opts.val_fraction,
                                                  sorted(opts.options.items())))
