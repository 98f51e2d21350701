"""Stanford Online Products (SOP): 120,053 images of 22,634 products in 12 super-classes.

Layout (Stanford_Online_Products.zip from cvgl.stanford.edu/projects/lifted_struct/, as read
by tensorflow_datasets' stanford_online_products and the metric-learning repos):

    Ebay_train.txt   header 'image_id class_id super_class_id path', then rows like
                     '1 1 1 bicycle_final/111085122871_0.JPG' (classes 1-11,318)
    Ebay_test.txt    same format (classes 11,319-22,634)
    bicycle_final/ cabinet_final/ ... toaster_final/   the images

Splits: train = Ebay_train, test = Ebay_test (the zero-shot protocol of Song et al. 2016 used by
DeML; the product classes of the two files are disjoint); val = a deterministic
`val_fraction` of the train *products* (seeded). SOP defines no other split.

Labels: instance = class_id (the product: retrieval is by instance); category = super_class_id
- 1 into the super-class names taken from the image folders ('bicycle_final' -> 'bicycle');
extra = {'path', 'class_id', 'image_id'}. No attributes, no boxes.
"""
from __future__ import annotations

from pathlib import Path

from shards.format import ShardError
from shards.importers import ImportOptions
from shards.importers.generic import (carve, find_file, image_file, make_plan, make_spec, path_keys, read_rows,
                                      read_text_lines, to_int)
from shards.plan import DatasetPlan

KNOWN_OPTIONS: tuple[str, ...] = ()
SOURCE = "https://cvgl.stanford.edu/projects/lifted_struct/"
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_list(path: Path) -> list[tuple[str, int, int, int, str]]:
    """Rows (where, image_id, class_id, super_class_id, rel path) of an Ebay_*.txt file."""
    lines = read_text_lines(path)
    if not lines or lines[0].split() != HEADER:
        raise ShardError(f"{path}:1: header must be '{' '.join(HEADER)}'; is this a Stanford Online Products list?")
    out = []
    for n, parts in read_rows(path, 4, " ".join(HEADER), skip=1, exact=True):
        where = f"{path}:{n}"
        ids = [to_int(p, where, h) for p, h in zip(parts[:3], HEADER)]
        out.append((where, ids[0], ids[1], ids[2], parts[3]))
    return out


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    src = Path(src)
    hint = "point --src at the extracted Stanford_Online_Products/ folder"
    rows = {split: read_list(find_file(src, (f"Ebay_{split}.txt",), f"SOP list Ebay_{split}.txt", hint))
            for split in ("train", "test")}
    train_classes = {r[2] for r in rows["train"]}
    clash = train_classes & {r[2] for r in rows["test"]}
    if clash:
        raise ShardError(f"Ebay_train.txt and Ebay_test.txt share class_id {min(clash)}; the zero-shot split needs disjoint classes")
    # every path checked first (inside --src, present), before anything is derived from it
    paths = {rel: image_file(src, rel, where) for split in rows for where, _, _, _, rel in rows[split]}
    supers: dict[int, tuple[str, str]] = {}
    for where, _, _, sup, rel in rows["train"] + rows["test"]:
        name = rel.split("/")[0].removesuffix("_final") if "/" in rel else f"super_class_{sup}"
        if supers.setdefault(sup, (name, where))[0] != name:
            raise ShardError(f"{where}: super_class_id {sup} is '{name}' here but '{supers[sup][0]}' at {supers[sup][1]}")
    if sorted(supers) != list(range(1, len(supers) + 1)):
        raise ShardError(f"{src}: super_class_id values {sorted(supers)} do not run 1..{len(supers)}")
    val = carve((str(c) for c in train_classes), opts.val_fraction, opts.seed, "sop/classes")
    keys = path_keys(r[4] for split in rows for r in rows[split])
    specs = []
    for split, items in rows.items():
        for where, image_id, cls, sup, rel in items:
            s = "val" if split == "train" and str(cls) in val else split
            specs.append(make_spec(keys[rel], paths[rel], s, opts, instance=str(cls), category=sup - 1,
                                   extra={"path": rel, "class_id": cls, "image_id": image_id}))
    return make_plan("sop", specs, [], [supers[i][0] for i in sorted(supers)], opts,
                     description="Stanford Online Products", source=SOURCE,
                     extra={"protocol": "zeroshot", "retrieval_label": "instance",
                            "val": f"{opts.val_fraction} of train products, seed {opts.seed}"})
