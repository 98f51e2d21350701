"""DeepFashion In-Shop Clothes Retrieval: 52,712 images of 7,982 items; train / query / gallery.

Layout ("In-shop Clothes Retrieval Benchmark" from mmlab.ie.cuhk.edu.hk/projects/DeepFashion,
as documented in open-mmlab/mmfashion docs/dataset/IN_SHOP_DATASET.md and read by mmpretrain's
InShop and the metric-learning repos). Every list file starts with a count line and a header line:

    Eval/list_eval_partition.txt   <image_name> <item_id> <evaluation_status>
                                   e.g. img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train
                                   (status train | query | gallery)
    Img/img/...                    the images (image_name is relative to Img/; a flat copy with
                                   img/ and the list files directly under --src also works)
    Anno/list_bbox_inshop.txt      optional: <image_name> <clothes_type> <pose_type> <x_1> <y_1> <x_2> <y_2>
    Anno/list_attr_cloth.txt       optional: <attribute_name> (one per row)
    Anno/list_attr_items.txt       optional: <item_id> <attribute labels: 1 | -1 | 0 (unknown)>
                                   (Anno/attributes/ is searched too, as in newer releases)

Splits: train / query / gallery from the partition file (items of train and query/gallery are
disjoint, as in DeML and Cooperative Embeddings); val = a deterministic `val_fraction` of the
train *items*. Labels: instance = item_id (retrieval is by instance); category = the clothes
category from the path ('WOMEN/Dresses'), sorted vocabulary; attributes (when the files are
there, --opt attributes=auto|on|off): the item attributes as binary (1 -> 1, -1 -> 0, 0 -> missing,
names sanitised) plus clothes_type (upper/lower/full) and pose_type (categorical) from the box
file; extra['bbox'] = [x_1/W, y_1/H, x_2/W, y_2/H]; --opt crop=yes crops to the box.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from shards.format import AttributeSpec, ShardError
from shards.importers import ImportOptions
from shards.importers.generic import (box_fields, carve, find_file, image_file, image_size, make_plan, make_spec,
                                      optional_file, path_keys, read_rows, read_text_lines, to_float, to_int,
                                      unique_names)
from shards.plan import DatasetPlan

KNOWN_OPTIONS: tuple[str, ...] = ("attributes", "crop")
SOURCE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
CLOTHES = ("upper", "lower", "full")
POSES = ("frontal", "side", "back", "zoom-out", "zoom-in", "stand-alone")


def read_counted(path: Path, fields: int, fmt: str, exact: bool = True) -> list[tuple[int, list[str]]]:
    """Rows of a DeepFashion list file (count line, header line, rows); the count is checked."""
    lines = read_text_lines(path)
    count = to_int(lines[0].strip() if lines else "", f"{path}:1", "first line (number of rows)")
    rows = list(read_rows(path, fields, fmt, skip=2, exact=exact))
    if len(rows) != count:
        raise ShardError(f"{path}: line 1 announces {count} rows but {len(rows)} follow; the file is truncated or edited")
    return rows


def _item_attributes(attr_file: Path, names_file: Path) -> tuple[list[str], dict[str, dict[str, int | None]]]:
    header = read_text_lines(names_file)[1:2]
    typed = bool(header) and len(header[0].split()) > 1  # 'attribute_name attribute_type' variant
    raw = []
    for _, parts in read_counted(names_file, 1, "<attribute_name>", exact=False):
        if typed and len(parts) > 1 and parts[-1].lstrip("-").isdigit():
            parts = parts[:-1]
        raw.append(" ".join(parts))
    names = unique_names(raw)
    items: dict[str, dict[str, int | None]] = {}
    for n, parts in read_counted(attr_file, 1 + len(names), f"<item_id> <{len(names)} labels>"):
        where = f"{attr_file}:{n}"
        if len(parts) != 1 + len(names):
            raise ShardError(f"{where}: expected {len(names)} labels ({names_file.name}), got {len(parts) - 1}")
        vals = []
        for p in parts[1:]:
            if p not in ("1", "-1", "0"):
                raise ShardError(f"{where}: attribute label {p!r} must be 1, -1 or 0")
            vals.append({"1": 1, "-1": 0}.get(p))
        labels = dict(zip(names, vals))
        if items.setdefault(parts[0], labels) != labels:
            raise ShardError(f"{where}: item {parts[0]} is listed twice with different labels")
    return names, items


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    src = Path(src)
    attr_mode = opts.opt("attributes", "auto", ("auto", "on", "off"))
    crop = opts.opt("crop", "no", ("no", "yes")) == "yes"
    part_file = find_file(src, ("Eval/list_eval_partition.txt", "list_eval_partition.txt"),
                          "In-Shop partition file", "point --src at 'In-shop Clothes Retrieval Benchmark/'")
    img_base = "Img/" if (src / "Img").is_dir() else ""
    rows = read_counted(part_file, 3, "<image_name> <item_id> <evaluation_status>")
    bbox_file = optional_file(src, ("Anno/list_bbox_inshop.txt", "list_bbox_inshop.txt"))
    if crop and bbox_file is None:
        raise ShardError(f"{src / 'Anno/list_bbox_inshop.txt'}: needed by --opt crop=yes; add it or drop the option")
    bboxes = {parts[0]: (n, parts) for n, parts in read_counted(
        bbox_file, 7, "<image_name> <clothes_type> <pose_type> <x_1> <y_1> <x_2> <y_2>")} if bbox_file else {}
    cand = ("Anno/list_attr_items.txt", "Anno/attributes/list_attr_items.txt", "list_attr_items.txt")
    names_cand = tuple(c.replace("items", "cloth") for c in cand)
    attr_file = None if attr_mode == "off" else optional_file(src, cand)
    if attr_mode == "on" and attr_file is None:
        find_file(src, cand, "In-Shop item attributes", "add it or use --opt attributes=auto|off")
    names, item_attrs = (_item_attributes(attr_file, find_file(src, names_cand, "In-Shop attribute names"))
                         if attr_file else ([], {}))

    for n, (img, item, status) in rows:
        if status not in ("train", "query", "gallery"):
            raise ShardError(f"{part_file}:{n}: evaluation_status {status!r} is not train, query or gallery")
    val = carve((r[1] for _, r in rows if r[2] == "train"), opts.val_fraction, opts.seed, "inshop/items")
    cats = sorted({"/".join(PurePosixPath(r[0]).parts[-4:-2]) for _, r in rows})
    keys = path_keys(str(PurePosixPath(r[0]).relative_to("img")) if r[0].startswith("img/") else r[0] for _, r in rows)
    attrs = [AttributeSpec(a, "binary") for a in names]
    if bboxes:
        attrs += [AttributeSpec("clothes_type", "categorical", CLOTHES), AttributeSpec("pose_type", "categorical", POSES)]
    specs = []
    for n, (img, item, status) in rows:
        where = f"{part_file}:{n}"
        path = image_file(src, img, where, base=img_base)
        values: dict[str, int | None] = dict(item_attrs.get(item, dict.fromkeys(names)))
        if attr_file and item not in item_attrs:
            raise ShardError(f"{attr_file}: item {item} (from {where}) has no attribute row")
        extra: dict = {"path": img}
        crop_px = None
        if img in bboxes:
            bn, b = bboxes[img]
            bwhere = f"{bbox_file}:{bn}"
            ct, pt = to_int(b[1], bwhere, "clothes_type"), to_int(b[2], bwhere, "pose_type")
            if not (1 <= ct <= len(CLOTHES) and 1 <= pt <= len(POSES)):
                raise ShardError(f"{bwhere}: clothes_type must be 1-3 and pose_type 1-6, got {ct} and {pt}")
            values.update(clothes_type=ct - 1, pose_type=pt - 1)
            box = [to_float(v, bwhere, k) for v, k in zip(b[3:7], ("x_1", "y_1", "x_2", "y_2"))]
            extra["bbox"], crop_px = box_fields(box, image_size(path), bwhere, crop)
        elif crop:
            raise ShardError(f"{bbox_file}: no box for {img} (needed by --opt crop=yes)")
        split = "val" if status == "train" and item in val else status
        rel = str(PurePosixPath(img).relative_to("img")) if img.startswith("img/") else img
        specs.append(make_spec(keys[rel], path, split, opts, instance=item,
                               category=cats.index("/".join(PurePosixPath(img).parts[-4:-2])),
                               attributes=values, extra={**extra, **({"crop_px": crop_px} if crop_px else {})},
                               crop=crop_px))
    return make_plan("inshop", specs, attrs, cats, opts, description="DeepFashion In-Shop Clothes Retrieval",
                     source=SOURCE, extra={"protocol": "zeroshot", "retrieval_label": "instance",
                                           "query_gallery": "query images are matched against gallery images",
                                           "val": f"{opts.val_fraction} of train items, seed {opts.seed}"})
