"""CUB-200-2011 (Caltech-UCSD Birds): 200 species, 11,788 images, 312 binary attributes, boxes.

Layout (CUB_200_2011.tgz from data.caltech.edu, as described by its README and read by e.g.
TDeVries/cub2011_dataset and torchvision-style loaders); --src is CUB_200_2011/ or its parent:

    images.txt                 <image_id> <image_name>           e.g. 1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
    image_class_labels.txt     <image_id> <class_id>             (1-based)
    classes.txt                <class_id> <class_name>           e.g. 1 001.Black_footed_Albatross
    train_test_split.txt       <image_id> <is_training_image>    (1 train, 0 test)
    bounding_boxes.txt         <image_id> <x> <y> <width> <height>   (pixels, floats)
    images/<image_name>
    attributes/image_attribute_labels.txt  <image_id> <attribute_id> <is_present> <certainty_id> <time>
                               (a few rows of the released file carry extra fields; the first
                               four are used)
    attributes.txt             <attribute_id> <attribute_name>, e.g. 1 has_bill_shape::curved_(up_or_down)
                               (top level of the archive, next to CUB_200_2011/; also looked up in
                               CUB_200_2011/ and CUB_200_2011/attributes/)

Splits (--opt split=): `zeroshot` (default; the metric-learning protocol of DeML and others):
the first half of the classes by id (1-100) train, the rest (101-200) test; val = a
deterministic `val_fraction` of the train *classes*. `official`: train_test_split.txt; val = a
deterministic `val_fraction` of the train images.

Labels: category = class index (class_id - 1) into classes.txt names; instance = None (retrieval
is by category); attributes = the 312 binary is_present labels, names sanitised
("has_bill_shape::curved_(up_or_down)" -> "has_bill_shape_curved_up_or_down"); with
--opt attributes=off none are read. The box goes to extra['bbox'] normalised to [0, 1]
(x0 = x / W, x1 = (x + width) / W); --opt crop=yes crops to it (extra['bbox'] is then the whole
image and extra['crop_px'] the pixel crop).
"""
from __future__ import annotations

from pathlib import Path

from shards.format import AttributeSpec, ShardError
from shards.importers import ImportOptions
from shards.importers.generic import (box_fields, carve, find_file, image_file, image_size, make_plan,
                                      make_spec, path_keys, read_rows, to_float, to_int,
                                      unique_names)
from shards.plan import DatasetPlan

KNOWN_OPTIONS: tuple[str, ...] = ("split", "attributes", "crop")
SOURCE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"


def _root(src: Path) -> str:
    return "CUB_200_2011/" if not (src / "images.txt").is_file() and (src / "CUB_200_2011" / "images.txt").is_file() else ""


def _id_map(path: Path, fmt: str) -> dict[int, tuple[int, list[str]]]:
    out: dict[int, tuple[int, list[str]]] = {}
    for n, parts in read_rows(path, len(fmt.split()), fmt):
        i = to_int(parts[0], f"{path}:{n}", "id")
        if i in out:
            raise ShardError(f"{path}:{n}: id {i} already given on line {out[i][0]}")
        out[i] = (n, parts[1:])
    return out


def read_attributes(src: Path, pre: str, image_ids: set[int]) -> tuple[list[str], dict[int, dict[str, int]]]:
    names_file = find_file(src, ("attributes.txt", f"{pre}attributes.txt", f"{pre}attributes/attributes.txt"),
                           "CUB attribute names (attributes.txt)", "it ships at the top of CUB_200_2011.tgz; "
                           "or import without attributes: --opt attributes=off")
    ids = {i: " ".join(rest) for i, (_, rest) in _id_map(names_file, "<attribute_id> <attribute_name>").items()}
    order = sorted(ids)
    names = dict(zip(order, unique_names(ids[i] for i in order)))
    labels_file = find_file(src, (f"{pre}attributes/image_attribute_labels.txt",), "CUB attribute labels",
                            "or import without attributes: --opt attributes=off")
    values: dict[int, dict[str, int]] = {}
    fmt = "<image_id> <attribute_id> <is_present> <certainty_id> <time>"
    for n, parts in read_rows(labels_file, 4, fmt):  # 3.7M rows: keep the loop lean
        try:
            img, aid, present = int(parts[0]), int(parts[1]), int(parts[2])
        except ValueError:
            raise ShardError(f"{labels_file}:{n}: expected integers '{fmt}', got {' '.join(parts[:3])!r}") from None
        if aid not in names or img not in image_ids or present not in (0, 1):
            why = (f"attribute_id {aid} is not in {names_file}" if aid not in names else
                   f"image_id {img} is not in images.txt" if img not in image_ids else
                   f"is_present must be 0 or 1, got {present}")
            raise ShardError(f"{labels_file}:{n}: {why}")
        row = values.get(img)
        if row is None:
            row = values[img] = {}
        row[names[aid]] = present
    return [names[i] for i in order], values


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    src = Path(src)
    split_opt = opts.opt("split", "zeroshot", ("zeroshot", "official"))
    use_attrs = opts.opt("attributes", "on", ("on", "off")) == "on"
    crop = opts.opt("crop", "no", ("no", "yes")) == "yes"
    pre = _root(src)
    f = {name: find_file(src, (f"{pre}{name}",), f"CUB file {name}") for name in
         ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt", "bounding_boxes.txt")}
    images = _id_map(f["images.txt"], "<image_id> <image_name>")
    classes = _id_map(f["classes.txt"], "<class_id> <class_name>")
    class_ids = sorted(classes)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise ShardError(f"{f['classes.txt']}: class ids must run 1..{len(class_ids)} without gaps")
    labels = {i: to_int(v[0], f"{f['image_class_labels.txt']}:{n}", "class_id")
              for i, (n, v) in _id_map(f["image_class_labels.txt"], "<image_id> <class_id>").items()}
    is_train = {i: v[0] for i, (_, v) in _id_map(f["train_test_split.txt"], "<image_id> <is_training_image>").items()}
    boxes = {i: (n, v) for i, (n, v) in _id_map(f["bounding_boxes.txt"], "<image_id> <x> <y> <width> <height>").items()}
    for name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train), ("bounding_boxes.txt", boxes)):
        missing = sorted(set(images) - set(table))
        if missing:
            raise ShardError(f"{f[name]}: no entry for image_id {missing[0]} (of images.txt); the file is incomplete")
    attr_names, attr_values = read_attributes(src, pre, set(images)) if use_attrs else ([], {})

    half = len(class_ids) // 2
    train_classes = [c for c in class_ids if c <= half]
    if split_opt == "zeroshot":
        val_groups = carve((str(c) for c in train_classes), opts.val_fraction, opts.seed, "cub200/classes")
    else:
        val_groups = carve((str(i) for i, t in is_train.items() if t == "1"), opts.val_fraction, opts.seed, "cub200/images")
    keys = path_keys(v[0] for _, v in images.values())
    specs = []
    for i, (n, (rel, *_)) in sorted(images.items()):
        where = f"{f['images.txt']}:{n}"
        cls = labels[i]
        if cls not in classes:
            raise ShardError(f"{f['image_class_labels.txt']}: image_id {i} has class_id {cls}, not in classes.txt")
        if split_opt == "zeroshot":
            split = "test" if cls > half else "val" if str(cls) in val_groups else "train"
        else:
            if is_train[i] not in ("0", "1"):
                raise ShardError(f"{f['train_test_split.txt']}: image_id {i}: is_training_image must be 0 or 1")
            split = "test" if is_train[i] == "0" else "val" if str(i) in val_groups else "train"
        path = image_file(src, rel, where, base=f"{pre}images")
        bn, b = boxes[i]
        bwhere = f"{f['bounding_boxes.txt']}:{bn}"
        x, y, w, h = (to_float(v, bwhere, k) for v, k in zip(b[:4], ("x", "y", "width", "height")))
        bbox, crop_px = box_fields((x, y, x + w, y + h), image_size(path), bwhere, crop)
        if use_attrs and i not in attr_values:
            raise ShardError(f"image_attribute_labels.txt: no labels for image_id {i}; the file is incomplete")
        extra = {"bbox": bbox, "image_id": i, "path": rel, **({"crop_px": crop_px} if crop_px else {})}
        specs.append(make_spec(keys[rel], path, split, opts, category=cls - 1, attributes=attr_values.get(i, {}),
                               extra=extra, crop=crop_px))
    return make_plan(
        "cub200", specs, [AttributeSpec(a, "binary") for a in attr_names],
        [" ".join(classes[c][1]) for c in class_ids], opts,
        description="Caltech-UCSD Birds-200-2011", source=SOURCE,
        extra={"protocol": split_opt, "retrieval_label": "category", "bbox": "extra.bbox, normalised x0,y0,x1,y1",
               "train_classes": f"1-{half}" if split_opt == "zeroshot" else "all",
               "val": f"{opts.val_fraction} of train {'classes' if split_opt == 'zeroshot' else 'images'}, seed {opts.seed}"})
