"""CompCars (web-nature): car images by make / model / year, model attributes, viewpoint + box.

Layout (the CompCars release, mmlab.ie.cuhk.edu.hk/datasets/comp_cars/; as read by Graviti's
tensorbay CompCars loader and the ednaml CoLabelCompCarsCrawler); --src is the folder holding
data/ or the data/ folder itself:

    data/image/<make_id>/<model_id>/<year>/<name>.jpg          (year may be 'unknown')
    data/label/<make_id>/<model_id>/<year>/<name>.txt          line 1 viewpoint (-1 uncertain, 1 front,
                                                               2 rear, 3 side, 4 front-side, 5 rear-side),
                                                               line 2 number of boxes, then 'x1 y1 x2 y2'
                                                               (1 <= x1 < x2 <= width)
    data/misc/attributes.txt        header 'model_id maximum_speed displacement door_number seat_number type';
                                    0 = unavailable; type 1-12 indexes car_type.mat
    data/misc/make_model_name.mat   make_names (cell, by make_id), model_names (cell, by model_id)
    data/misc/car_type.mat          types (1 x 12 cell)
    data/train_test_split/classification/{train,test}.txt      one image path (as under image/) a line
    data/train_test_split/verification/verification_train.txt  same format

Splits (--opt split=): `zeroshot` (default; Cooperative Embeddings following Yang et al.):
train = Part-I (classification train.txt + test.txt, 431 models), test = Part-II
(verification_train.txt, 111 models); val = a deterministic `val_fraction` of the train
*models*. `official`: classification train.txt / test.txt; val = a `val_fraction` of train
images. Images listed but absent from image/ (the release has some) are skipped and counted in
meta.extra['skipped_missing'] (--opt missing=error to fail instead); --opt drop_unlabelled=yes
drops models without an attributes.txt row or with all attributes unavailable (the paper drops 8).

Labels: instance = model_id (retrieval by car model), category = make_id - 1 into make_names;
attributes: max_speed and displacement continuous, min-max normalised over the non-zero values
of attributes.txt (min/max in meta.extra['normalisation']); doors and seats categorical
(ordinal, sorted distinct counts); type categorical (car_type.mat); viewpoint categorical; 0 /
-1 -> missing. extra: bbox ([(x1-1)/W, (y1-1)/H, x2/W, y2/H]), model_name, year, path.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from shards.format import AttributeSpec, ShardError
from shards.importers import ImportOptions
from shards.importers.generic import (box_fields, carve, find_file, image_size, make_plan, make_spec, path_keys,
                                      read_rows, read_text_lines, to_float, to_int)
from shards.plan import DatasetPlan, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ("split", "crop", "missing", "drop_unlabelled")
SOURCE = "http://mmlab.ie.cuhk.edu.hk/datasets/comp_cars/"
VIEWS = ("front", "rear", "side", "front-side", "rear-side")
ATTR_HEADER = ["model_id", "maximum_speed", "displacement", "door_number", "seat_number", "type"]


def _cells(path: Path, var: str) -> list[str]:
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ShardError(f"{path}: not a readable MATLAB file ({e})") from None
    if var not in mat:
        raise ShardError(f"{path}: variable {var!r} missing; is this the CompCars file?")
    return [str(np.asarray(c).ravel()[0]) if np.asarray(c).size else "" for c in mat[var].ravel()]


def read_model_attributes(path: Path) -> dict[int, tuple[float, float, int, int, int]]:
    lines = read_text_lines(path)
    if not lines or lines[0].split() != ATTR_HEADER:
        raise ShardError(f"{path}:1: header must be '{' '.join(ATTR_HEADER)}'")
    out = {}
    for n, p in read_rows(path, 6, " ".join(ATTR_HEADER), skip=1, exact=True):
        w = f"{path}:{n}"
        out[to_int(p[0], w, "model_id")] = (to_float(p[1], w, "maximum_speed"), to_float(p[2], w, "displacement"),
                                           to_int(p[3], w, "door_number"), to_int(p[4], w, "seat_number"),
                                           to_int(p[5], w, "type"))
    return out


def read_list(path: Path) -> list[tuple[str, str, int, int, str]]:
    """(where, rel path, make_id, model_id, year) per line of a split list."""
    out = []
    for n, parts in read_rows(path, 1, "<make_id>/<model_id>/<year>/<name>.jpg"):
        where, rel = f"{path}:{n}", parts[0]
        p = PurePosixPath(rel).parts
        if len(p) != 4:
            raise ShardError(f"{where}: {rel!r} is not make_id/model_id/year/name.jpg")
        out.append((where, rel, to_int(p[0], where, "make_id"), to_int(p[1], where, "model_id"), p[2]))
    return out


def read_label(path: Path, where: str) -> tuple[int, list[float]]:
    if not path.is_file():
        raise ShardError(f"{path}: label file not found (for the image of {where}); is data/label/ extracted?")
    lines = [ln.split() for ln in read_text_lines(path) if ln.strip()]
    if len(lines) < 3 or len(lines[2]) != 4:
        raise ShardError(f"{path}: expected viewpoint, box count and 'x1 y1 x2 y2' lines (image from {where})")
    view = to_int(lines[0][0], f"{path}:1", "viewpoint")
    if view not in (-1, 1, 2, 3, 4, 5):
        raise ShardError(f"{path}:1: viewpoint {view} is not -1 or 1-5")
    x1, y1, x2, y2 = (to_float(v, f"{path}:3", "box") for v in lines[2])
    return view, [x1 - 1, y1 - 1, x2, y2]


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    src = Path(src)
    split_opt = opts.opt("split", "zeroshot", ("zeroshot", "official"))
    crop = opts.opt("crop", "no", ("no", "yes")) == "yes"
    skip_missing = opts.opt("missing", "skip", ("skip", "error")) == "skip"
    drop = opts.opt("drop_unlabelled", "no", ("no", "yes")) == "yes"
    pre = "data/" if (src / "data" / "misc").is_dir() else ""
    hint = "point --src at the CompCars folder holding data/ (image, label, misc, train_test_split)"
    misc = {n: find_file(src, (f"{pre}misc/{n}",), f"CompCars {n}", hint)
            for n in ("attributes.txt", "make_model_name.mat", "car_type.mat")}
    model_attrs = read_model_attributes(misc["attributes.txt"])
    makes, models = _cells(misc["make_model_name.mat"], "make_names"), _cells(misc["make_model_name.mat"], "model_names")
    types = _cells(misc["car_type.mat"], "types")
    split_dir = f"{pre}train_test_split/"
    lists = {"train": ["classification/train.txt"], "test": ["classification/test.txt"]}
    if split_opt == "zeroshot":
        lists = {"train": ["classification/train.txt", "classification/test.txt"],
                 "test": ["verification/verification_train.txt"]}
    rows: dict[str, list] = {s: [r for f in fs for r in read_list(find_file(
        src, (split_dir + f,), f"CompCars split list {f}", "or use --opt split=official" if "verif" in f else hint))]
        for s, fs in lists.items()}

    speeds = [a[0] for a in model_attrs.values() if a[0] > 0] or [0.0]
    disps = [a[1] for a in model_attrs.values() if a[1] > 0] or [0.0]
    doors = sorted({a[2] for a in model_attrs.values() if a[2] > 0})
    seats = sorted({a[3] for a in model_attrs.values() if a[3] > 0})
    norm = {"max_speed": {"min": min(speeds), "max": max(speeds), "unit": "km/h"},
            "displacement": {"min": min(disps), "max": max(disps), "unit": "L"}}

    def scale(v: float, k: str) -> float | None:
        return None if v <= 0 else (v - norm[k]["min"]) / ((norm[k]["max"] - norm[k]["min"]) or 1.0)

    attrs = [AttributeSpec("max_speed", "continuous", description="km/h, min-max normalised"),
             AttributeSpec("displacement", "continuous", description="litres, min-max normalised"),
             AttributeSpec("doors", "categorical", tuple(map(str, doors)), ordinal=True),
             AttributeSpec("seats", "categorical", tuple(map(str, seats)), ordinal=True),
             AttributeSpec("type", "categorical", tuple(types)),
             AttributeSpec("viewpoint", "categorical", VIEWS)]

    def labels_of(model: int) -> dict[str, Any] | None:
        a = model_attrs.get(model)
        if a is None or not any(a):
            return None
        if a[4] > len(types):
            raise ShardError(f"{misc['attributes.txt']}: model {model}: type {a[4]} is not 0-{len(types)} (car_type.mat)")
        return {"max_speed": scale(a[0], "max_speed"), "displacement": scale(a[1], "displacement"),
                "doors": doors.index(a[2]) if a[2] > 0 else None, "seats": seats.index(a[3]) if a[3] > 0 else None,
                "type": a[4] - 1 if a[4] > 0 else None}

    seen: dict[str, str] = {}
    for s, items in rows.items():
        for where, rel, *_ in items:
            if rel in seen:
                raise ShardError(f"{where}: {rel} is already listed at {seen[rel]}; the split lists overlap")
            seen[rel] = where
    if split_opt == "zeroshot":
        val = carve((str(r[3]) for r in rows["train"]), opts.val_fraction, opts.seed, "compcars/models")
    else:
        val = carve((r[1] for r in rows["train"]), opts.val_fraction, opts.seed, "compcars/images")
    keys = path_keys(seen)
    specs, missing, dropped = [], [], 0
    for s, items in rows.items():
        for where, rel, make, model, year in items:
            path = safe_join(safe_join(src, f"{pre}image"), rel, f"{where}: image path")
            if not path.is_file():
                if not skip_missing:
                    raise ShardError(f"{where}: image {rel!r} not found at {path} (--opt missing=skip to skip such lines)")
                missing.append(rel)
                continue
            values = labels_of(model)
            if values is None and drop:
                dropped += 1
                continue
            if not 1 <= make <= len(makes):
                raise ShardError(f"{where}: make_id {make} is not in make_model_name.mat (1-{len(makes)})")
            label = safe_join(safe_join(src, f"{pre}label"), str(PurePosixPath(rel).with_suffix(".txt")), f"{where}: label")
            view, box = read_label(label, where)
            bbox, crop_px = box_fields(box, image_size(path), str(label), crop)
            values = {**(values or dict.fromkeys(["max_speed", "displacement", "doors", "seats", "type"])),
                      "viewpoint": view - 1 if view > 0 else None}
            extra = {"bbox": bbox, "path": rel, "year": int(year) if year.isdigit() else None,
                     "model_name": models[model - 1] if 0 < model <= len(models) else "",
                     **({"crop_px": crop_px} if crop_px else {})}
            split = "val" if s == "train" and (str(model) if split_opt == "zeroshot" else rel) in val else s
            specs.append(make_spec(keys[rel], path, split, opts, instance=str(model), category=make - 1,
                                   attributes=values, extra=extra, crop=crop_px))
    shared = sorted({r[3] for r in rows["train"]} & {r[3] for r in rows["test"]})
    return make_plan("compcars", specs, attrs, [m or f"make_{i + 1}" for i, m in enumerate(makes)], opts,
                     description="CompCars web-nature", source=SOURCE,
                     extra={"protocol": split_opt, "retrieval_label": "instance", "normalisation": norm,
                            "normalisation_formula": "(v - min) / (max - min); 0 (unavailable) -> missing",
                            "skipped_missing": len(missing), "skipped_missing_examples": missing[:5],
                            "dropped_unlabelled": dropped, "models_in_train_and_test": len(shared),
                            "val": f"{opts.val_fraction} of train {'models' if split_opt == 'zeroshot' else 'images'}, seed {opts.seed}"})
