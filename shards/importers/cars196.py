"""Stanford Cars (CARS196): 196 classes (make, model, year), 16,185 images, one box each.

Layout (the all-in-one release used by the metric-learning code, e.g. Proxy-Anchor's
dataset/cars.py and jingyj203/TSF-Enhance: car_ims.tgz + cars_annos.mat from
ai.stanford.edu/~jkrause/cars/):

    cars_annos.mat     'annotations': 1 x N MATLAB struct array with fields
                           relative_im_path  'car_ims/000001.jpg'
                           bbox_x1, bbox_y1, bbox_x2, bbox_y2   pixels (1-based, inclusive)
                           class             1..196
                           test              0 (train) / 1 (test) of the classification split
                       'class_names': 1 x 196 cell array, e.g. 'AM General Hummer SUV 2000'
    car_ims/000001.jpg ...

Splits (--opt split=): `zeroshot` (default; DeML and the metric-learning papers): classes
1-98 train, 99-196 test (first/second half by id); val = a deterministic `val_fraction` of the
train classes. `official`: the 'test' flag (8,144 train / 8,041 test); val = a `val_fraction`
of the train images.

Labels: category = class - 1 into class_names; instance = None (retrieval by category); no
attributes. extra['bbox'] = [(x1 - 1) / W, (y1 - 1) / H, x2 / W, y2 / H] (MATLAB pixel boxes);
--opt crop=yes crops to the box. The devkit layout (cars_train_annos.mat / cars_test_annos.mat)
is not read: use cars_annos.mat, which covers both halves.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.format import ShardError
from shards.importers import ImportOptions
from shards.importers.generic import box_fields, carve, find_file, image_file, image_size, make_plan, make_spec, path_keys
from shards.plan import DatasetPlan

KNOWN_OPTIONS: tuple[str, ...] = ("split", "crop")
SOURCE = "https://ai.stanford.edu/~jkrause/cars/car_dataset.html"
FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def _scalar(v: Any, where: str, field: str) -> Any:
    import numpy as np

    a = np.asarray(v).ravel()
    if a.size != 1:
        raise ShardError(f"{where}: field {field!r} should hold one value, holds {a.size}")
    return a[0].item() if hasattr(a[0], "item") else a[0]


def read_annos(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """cars_annos.mat -> ([{field: value}], class_names)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ShardError(f"{path}: not a readable MATLAB file ({e}); re-download cars_annos.mat") from None
    for var in ("annotations", "class_names"):
        if var not in mat:
            raise ShardError(f"{path}: variable {var!r} missing (has {sorted(k for k in mat if not k.startswith('__'))})")
    ann = mat["annotations"].ravel()
    names = ann.dtype.names or ()
    missing = [f for f in FIELDS if f not in names]
    if missing:
        raise ShardError(f"{path}: 'annotations' lacks fields {missing} (has {list(names)}); is this cars_annos.mat?")
    rows = []
    for i, a in enumerate(ann):
        where = f"{path}: annotations[{i}]"
        rows.append({f: str(_scalar(a[f], where, f)) if f == "relative_im_path" else _scalar(a[f], where, f)
                     for f in FIELDS})
    class_names = [str(_scalar(c, f"{path}: class_names[{j}]", "class_names")) for j, c in enumerate(mat["class_names"].ravel())]
    return rows, class_names


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    src = Path(src)
    split_opt = opts.opt("split", "zeroshot", ("zeroshot", "official"))
    crop = opts.opt("crop", "no", ("no", "yes")) == "yes"
    annos_file = find_file(src, ("cars_annos.mat", "devkit/cars_annos.mat"), "CARS196 annotations (cars_annos.mat)",
                           "download cars_annos.mat and car_ims.tgz from the Stanford Cars page into --src")
    rows, class_names = read_annos(annos_file)
    n_classes = len(class_names)
    half = n_classes // 2
    for i, r in enumerate(rows):
        where = f"{annos_file}: annotations[{i}] ({r['relative_im_path']})"
        if not isinstance(r["class"], int) or not 1 <= r["class"] <= n_classes:
            raise ShardError(f"{where}: class {r['class']!r} is not in 1..{n_classes} (class_names)")
        if r["test"] not in (0, 1):
            raise ShardError(f"{where}: test flag must be 0 or 1, got {r['test']!r}")
    if split_opt == "zeroshot":
        val = carve((str(r["class"]) for r in rows if r["class"] <= half), opts.val_fraction, opts.seed, "cars196/classes")
    else:
        val = carve((r["relative_im_path"] for r in rows if r["test"] == 0), opts.val_fraction, opts.seed, "cars196/images")
    keys = path_keys(r["relative_im_path"] for r in rows)
    specs = []
    for i, r in enumerate(rows):
        rel, cls = r["relative_im_path"], r["class"]
        where = f"{annos_file}: annotations[{i}]"
        if split_opt == "zeroshot":
            split = "test" if cls > half else "val" if str(cls) in val else "train"
        else:
            split = "test" if r["test"] == 1 else "val" if rel in val else "train"
        path = image_file(src, rel, where)
        box = [float(r["bbox_x1"]) - 1, float(r["bbox_y1"]) - 1, float(r["bbox_x2"]), float(r["bbox_y2"])]
        bbox, crop_px = box_fields(box, image_size(path), where, crop)
        extra = {"bbox": bbox, "path": rel, "test": int(r["test"]), **({"crop_px": crop_px} if crop_px else {})}
        specs.append(make_spec(keys[rel], path, split, opts, category=cls - 1, extra=extra, crop=crop_px))
    return make_plan("cars196", specs, [], class_names, opts, description="Stanford Cars (CARS196)", source=SOURCE,
                     extra={"protocol": split_opt, "retrieval_label": "category",
                            "train_classes": f"1-{half}" if split_opt == "zeroshot" else "all",
                            "bbox": "extra.bbox, normalised x0,y0,x1,y1",
                            "val": f"{opts.val_fraction} of train {'classes' if split_opt == 'zeroshot' else 'images'}, seed {opts.seed}"})
