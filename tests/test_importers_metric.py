"""Metric-learning importers (cub200, cars196, sop, inshop, compcars, generic) on miniature
replicas of the published layouts: split membership, labels, loading, errors, writer round trip."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from shards.format import ShardError, check_sample
from shards.importers import ImportOptions, plan_import

NOVAL = ImportOptions(val_fraction=0.0)


def img(path: Path, size: tuple[int, int] = (16, 12), seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * (seed + 1) % 256).astype(np.uint8)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    Image.fromarray(arr).save(path, format=fmt)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def keys(plan, split: str) -> list[str]:
    return [s["key"] for s in plan.splits[split]]


def by_key(plan) -> dict:
    return {s["key"]: s for specs in plan.splits.values() for s in specs}


def check_all(plan) -> None:
    for split, specs in plan.splits.items():
        assert [s["key"] for s in specs] == sorted(s["key"] for s in specs)
        for spec in specs:
            assert spec["split"] == split
            check_sample(plan.load(spec), plan.meta)


def roundtrip(plan, tmp_path: Path) -> None:
    writer = pytest.importorskip("shards.writer")
    reader = pytest.importorskip("shards.reader")
    out = tmp_path / "shards_out"
    writer.write_dataset(plan, out, shard_size=4, workers=1, progress=False)
    for split, specs in plan.splits.items():
        got = list(reader.iter_samples(out, split))
        assert [g["key"] for g in got] == [s["key"] for s in specs]
        for g, s in zip(got, specs):
            assert g["label"]["category"] == s.get("category")
            assert g["label"]["instance"] == s.get("instance")
            assert g["label"]["attributes"] == s.get("attributes", {})


# ------------------------------------------------------------------ CUB-200-2011
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani"]
CUB_ATTRS = ["has_bill_shape::curved_(up_or_down)", "has_wing_color::blue", "has_size::small_(5_-_9_in)"]


def make_cub(root: Path) -> Path:
    cub = root / "CUB_200_2011"
    images, labels, split, boxes, attrs = [], [], [], [], []
    for i in range(1, 9):
        cls = (i - 1) // 2 + 1
        rel = f"{CUB_CLASSES[cls - 1]}/{CUB_CLASSES[cls - 1][4:]}_{i:04d}_{100 + i}.jpg"
        img(cub / "images" / rel, seed=i)
        images.append(f"{i} {rel}")
        labels.append(f"{i} {cls}")
        split.append(f"{i} {i % 2}")
        boxes.append(f"{i} 2.0 3.0 8.0 6.0")
        for a in range(1, 4):
            extra = " 0 0" if (i, a) == (3, 2) else ""  # the released file has a few 7-field rows
            attrs.append(f"{i} {a} {int((i + a) % 2 == 0)} 3 1.5{extra}")
    for name, rows in (("images", images), ("image_class_labels", labels), ("train_test_split", split),
                       ("bounding_boxes", boxes)):
        write(cub / f"{name}.txt", "\n".join(rows) + "\n")
    write(cub / "classes.txt", "".join(f"{i} {c}\n" for i, c in enumerate(CUB_CLASSES, 1)))
    write(cub / "attributes" / "image_attribute_labels.txt", "\n".join(attrs) + "\n")
    write(root / "attributes.txt", "".join(f"{i} {a}\n" for i, a in enumerate(CUB_ATTRS, 1)))
    return root


def test_cub200(tmp_path: Path) -> None:
    src = make_cub(tmp_path / "src")
    p = plan_import("cub200", src, NOVAL)
    assert p.meta.splits == ("train", "test")
    assert len(keys(p, "train")) == 4 and len(keys(p, "test")) == 4
    assert {s["category"] for s in p.splits["train"]} == {0, 1} and {s["category"] for s in p.splits["test"]} == {2, 3}
    assert p.meta.categories == tuple(CUB_CLASSES)
    assert p.meta.attribute_names == ("has_bill_shape_curved_up_or_down", "has_wing_color_blue", "has_size_small_5_-_9_in")
    assert {a.kind for a in p.meta.attributes} == {"binary"}
    s = by_key(p)["001_Black_footed_Albatross-Black_footed_Albatross_0001_101"]
    assert s["attributes"] == {"has_bill_shape_curved_up_or_down": 1, "has_wing_color_blue": 0, "has_size_small_5_-_9_in": 1}
    assert s["extra"]["bbox"] == pytest.approx([2 / 16, 3 / 12, 10 / 16, 9 / 12], abs=1e-6)
    check_all(p)
    p = plan_import("cub200", src, ImportOptions())
    val_cats = {s["category"] for s in p.splits["val"]}
    assert len(val_cats) == 1 and val_cats.isdisjoint(s["category"] for s in p.splits["train"])
    assert len(keys(p, "train")) + len(keys(p, "val")) == 4
    assert plan_import("cub200", src, ImportOptions()).splits == p.splits  # deterministic
    off = plan_import("cub200", src, ImportOptions(val_fraction=0, options={"split": "official", "attributes": "off"}))
    assert {by_key(off)[k]["extra"]["image_id"] % 2 for k in keys(off, "test")} == {0} and not off.meta.attributes
    crop = plan_import("cub200", src, ImportOptions(options={"crop": "yes"}))
    spec = crop.splits["test"][0]
    assert spec["crop"] == [2, 3, 10, 9] and spec["extra"]["bbox"] == [0.0, 0.0, 1.0, 1.0]
    assert Image.open(io.BytesIO(crop.load(spec).image)).size == (8, 6)
    roundtrip(plan_import("cub200", src, ImportOptions()), tmp_path)


def test_cub200_errors(tmp_path: Path) -> None:
    src = make_cub(tmp_path / "src")
    lines = (src / "CUB_200_2011/bounding_boxes.txt").read_text().splitlines()
    write(src / "CUB_200_2011/bounding_boxes.txt", "\n".join(lines[:2] + ["3 1.0 2.0"] + lines[3:]))
    with pytest.raises(ShardError, match=r"bounding_boxes\.txt:3"):
        plan_import("cub200", src, NOVAL)
    src = make_cub(tmp_path / "esc")
    lines = (src / "CUB_200_2011/images.txt").read_text().splitlines()
    write(src / "CUB_200_2011/images.txt", "\n".join(["1 ../x.jpg"] + lines[1:]))
    with pytest.raises(ShardError, match="escapes"):
        plan_import("cub200", src, NOVAL)
    (src / "CUB_200_2011/images.txt").unlink()
    with pytest.raises(ShardError, match=r"images\.txt"):
        plan_import("cub200", src, NOVAL)
    src = make_cub(tmp_path / "b")
    (src / "attributes.txt").unlink()
    with pytest.raises(ShardError, match=r"attributes\.txt.*attributes=off"):
        plan_import("cub200", src, NOVAL)
    assert plan_import("cub200", src, ImportOptions(options={"attributes": "off"})).meta.attributes == ()
    with pytest.raises(ShardError, match="not an option"):
        plan_import("cub200", src, ImportOptions(options={"bogus": "1"}))


# ------------------------------------------------------------------ CARS196 (cars_annos.mat)
CAR_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def make_cars(root: Path, rows: list[tuple] | None = None) -> Path:
    """cars_annos.mat as MATLAB writes it: 'annotations' a 1 x N struct array, 'class_names' 1 x C cell."""
    rows = rows or [(f"car_ims/{i:06d}.jpg", 2, 3, 10, 9, (i - 1) // 2 + 1, i % 2) for i in range(1, 9)]
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in CAR_FIELDS])
    for i, (rel, x1, y1, x2, y2, cls, test) in enumerate(rows):
        ann[0, i] = (np.array([rel]), *(np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)),
                     np.array([[cls]], dtype=np.uint8), np.array([[test]], dtype=np.uint8))
        if ".." not in rel:
            img(root / rel, seed=i)
    names = np.empty((1, 4), dtype=object)
    names[0, :] = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008"]
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return root


def test_cars196(tmp_path: Path) -> None:
    src = make_cars(tmp_path / "src")
    mat = scipy.io.loadmat(src / "cars_annos.mat")  # same shapes as the released file
    assert mat["annotations"].shape == (1, 8) and mat["annotations"].dtype.names == CAR_FIELDS
    assert mat["class_names"].shape == (1, 4)
    p = plan_import("cars196", src, NOVAL)
    assert keys(p, "train") == [f"car_ims-{i:06d}" for i in range(1, 5)]
    assert keys(p, "test") == [f"car_ims-{i:06d}" for i in range(5, 9)]
    assert p.meta.categories[1] == "Acura RL Sedan 2012" and by_key(p)["car_ims-000003"]["category"] == 1
    # MATLAB boxes are 1-based inclusive: x1=2..x2=10 of a 16 px wide image -> [1/16, 10/16]
    assert by_key(p)["car_ims-000001"]["extra"]["bbox"] == pytest.approx([1 / 16, 2 / 12, 10 / 16, 9 / 12], abs=1e-6)
    check_all(p)
    off = plan_import("cars196", src, ImportOptions(val_fraction=0, options={"split": "official"}))
    assert keys(off, "test") == [f"car_ims-{i:06d}" for i in (1, 3, 5, 7)]
    p = plan_import("cars196", src, ImportOptions())
    assert {s["category"] for s in p.splits["val"]}.isdisjoint(s["category"] for s in p.splits["train"])
    roundtrip(p, tmp_path)


def test_cars196_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match=r"cars_annos\.mat"):
        plan_import("cars196", tmp_path / "empty", NOVAL)
    src = make_cars(tmp_path / "bad", [("car_ims/000001.jpg", 2, 3, 10, 9, 7, 0), ("car_ims/000002.jpg", 2, 3, 10, 9, 1, 0)])
    with pytest.raises(ShardError, match=r"annotations\[0\].*class 7"):
        plan_import("cars196", src, NOVAL)
    src = make_cars(tmp_path / "esc", [("../x.jpg", 2, 3, 10, 9, 1, 0), ("car_ims/000002.jpg", 2, 3, 10, 9, 1, 0)])
    with pytest.raises(ShardError, match="escapes"):
        plan_import("cars196", src, NOVAL)


# ------------------------------------------------------------------ Stanford Online Products
SOP_HEADER = "image_id class_id super_class_id path\n"


def make_sop(root: Path) -> Path:
    train, test = [], []
    for i in range(1, 9):
        cls, sup = (i - 1) // 2 + 1, 1 if i <= 2 or 5 <= i <= 6 else 2
        rel = f"{('bicycle', 'chair')[sup - 1]}_final/{111085122870 + cls}_{i % 2}.JPG"
        img(root / rel, seed=i)
        (train if cls <= 2 else test).append(f"{len(train if cls <= 2 else test) + 1} {cls} {sup} {rel}")
    write(root / "Ebay_train.txt", SOP_HEADER + "\n".join(train) + "\n")
    write(root / "Ebay_test.txt", SOP_HEADER + "\n".join(test) + "\n")
    return root


def test_sop(tmp_path: Path) -> None:
    src = make_sop(tmp_path / "src")
    p = plan_import("sop", src, NOVAL)
    assert p.meta.categories == ("bicycle", "chair") and p.meta.splits == ("train", "test")
    assert keys(p, "train") == ["bicycle_final-111085122871_0", "bicycle_final-111085122871_1",
                                "chair_final-111085122872_0", "chair_final-111085122872_1"]
    s = by_key(p)["bicycle_final-111085122873_1"]
    assert (s["split"], s["instance"], s["category"]) == ("test", "3", 0)
    check_all(p)
    p = plan_import("sop", src, ImportOptions())
    assert len({s["instance"] for s in p.splits["val"]}) == 1
    assert {s["instance"] for s in p.splits["val"]}.isdisjoint(s["instance"] for s in p.splits["train"])
    roundtrip(p, tmp_path)


def test_sop_errors(tmp_path: Path) -> None:
    src = make_sop(tmp_path / "a")
    (src / "Ebay_test.txt").unlink()
    with pytest.raises(ShardError, match=r"Ebay_test\.txt"):
        plan_import("sop", src, NOVAL)
    src = make_sop(tmp_path / "b")
    write(src / "Ebay_test.txt", (src / "Ebay_test.txt").read_text() + "5 3 2\n")
    with pytest.raises(ShardError, match=r"Ebay_test\.txt:6"):
        plan_import("sop", src, NOVAL)
    write(src / "Ebay_test.txt", SOP_HEADER + "1 3 2 chair_final/../../x.JPG\n")
    with pytest.raises(ShardError, match="escapes"):
        plan_import("sop", src, NOVAL)


# ------------------------------------------------------------------ DeepFashion In-Shop
INSHOP = [  # image_name, item_id, status, (clothes_type, pose_type)
    ("img/WOMEN/Dresses/id_00000001/02_1_front.jpg", "id_00000001", "train", (3, 1)),
    ("img/WOMEN/Dresses/id_00000001/02_2_side.jpg", "id_00000001", "train", (3, 2)),
    ("img/MEN/Denim/id_00000002/01_1_front.jpg", "id_00000002", "train", (2, 1)),
    ("img/MEN/Denim/id_00000002/01_3_back.jpg", "id_00000002", "train", (2, 3)),
    ("img/WOMEN/Dresses/id_00000003/03_1_front.jpg", "id_00000003", "query", (3, 1)),
    ("img/WOMEN/Dresses/id_00000003/03_2_side.jpg", "id_00000003", "gallery", (3, 2)),
    ("img/MEN/Denim/id_00000004/04_1_front.jpg", "id_00000004", "query", (1, 5)),
    ("img/MEN/Denim/id_00000004/04_4_full.jpg", "id_00000004", "gallery", (1, 6)),
]


def make_inshop(root: Path) -> Path:
    for i, (name, *_) in enumerate(INSHOP):
        img(root / "Img" / name, seed=i)
    write(root / "Eval/list_eval_partition.txt", f"{len(INSHOP)}\nimage_name item_id evaluation_status\n"
          + "".join(f"{n}  {item}  {st}\n" for n, item, st, _ in INSHOP))
    write(root / "Anno/list_bbox_inshop.txt", f"{len(INSHOP)}\nimage_name clothes_type pose_type x_1 y_1 x_2 y_2\n"
          + "".join(f"{n} {c} {p} 4 0 12 12\n" for n, _, _, (c, p) in INSHOP))
    write(root / "Anno/list_attr_cloth.txt", "3\nattribute_name\na-line\nfloral print\nsleeveless\n")
    write(root / "Anno/list_attr_items.txt", "4\nitem_id attribute_labels\n" + "".join(
        f"id_0000000{i} {v}\n" for i, v in ((1, "1 -1 0"), (2, "-1 -1 1"), (3, "1 1 1"), (4, "0 0 -1"))))
    return root


def test_inshop(tmp_path: Path) -> None:
    src = make_inshop(tmp_path / "src")
    p = plan_import("inshop", src, NOVAL)
    assert p.meta.splits == ("train", "query", "gallery")
    assert [len(p.splits[s]) for s in p.meta.splits] == [4, 2, 2]
    assert p.meta.categories == ("MEN/Denim", "WOMEN/Dresses")
    assert p.meta.attribute_names == ("a-line", "floral_print", "sleeveless", "clothes_type", "pose_type")
    s = by_key(p)["WOMEN-Dresses-id_00000001-02_2_side"]
    assert (s["instance"], s["category"], s["split"]) == ("id_00000001", 1, "train")
    assert s["attributes"] == {"a-line": 1, "floral_print": 0, "sleeveless": None, "clothes_type": 2, "pose_type": 1}
    assert s["extra"]["bbox"] == pytest.approx([4 / 16, 0.0, 12 / 16, 1.0], abs=1e-6)
    assert {x["instance"] for x in p.splits["query"]} == {"id_00000003", "id_00000004"}
    check_all(p)
    p = plan_import("inshop", src, ImportOptions())
    assert len(p.splits["val"]) == 2 and p.splits["val"][0]["instance"] not in {x["instance"] for x in p.splits["train"]}
    bare = make_inshop(tmp_path / "bare")
    for f in ("list_attr_items", "list_attr_cloth", "list_bbox_inshop"):
        (bare / f"Anno/{f}.txt").unlink()
    assert plan_import("inshop", bare, NOVAL).meta.attributes == ()
    roundtrip(p, tmp_path)


def test_inshop_errors(tmp_path: Path) -> None:
    src = make_inshop(tmp_path / "a")
    (src / "Eval/list_eval_partition.txt").unlink()
    with pytest.raises(ShardError, match=r"list_eval_partition\.txt"):
        plan_import("inshop", src, NOVAL)
    src = make_inshop(tmp_path / "b")
    part = src / "Eval/list_eval_partition.txt"
    write(part, part.read_text().replace("id_00000003  query", "id_00000003  probe"))
    with pytest.raises(ShardError, match=r"list_eval_partition\.txt:7: evaluation_status 'probe'"):
        plan_import("inshop", src, NOVAL)
    write(part, part.read_text().replace("probe", "query") + "img/x.jpg id_9\n")
    with pytest.raises(ShardError, match=r"list_eval_partition\.txt:11"):
        plan_import("inshop", src, NOVAL)
    write(part, "1\nimage_name item_id evaluation_status\n../x.jpg id_00000001 train\n")
    with pytest.raises(ShardError, match="escapes"):
        plan_import("inshop", src, NOVAL)
    src = make_inshop(tmp_path / "c")
    items = src / "Anno/list_attr_items.txt"
    write(items, items.read_text().replace("-1 -1 1", "-1 2 1"))
    with pytest.raises(ShardError, match=r"list_attr_items\.txt:4"):
        plan_import("inshop", src, NOVAL)


# ------------------------------------------------------------------ CompCars
CC_TYPES = ["MPV", "SUV", "sedan", "hatchback", "minibus", "fastback", "estate", "pickup", "hardtop convertible",
            "sports", "crossover", "convertible"]
CC_IMAGES = {  # rel path -> (list, viewpoint)
    "1/10/2014/3ac218c0c6c378.jpg": ("classification/train.txt", 1),
    "1/10/2014/07b90decb92ba6.jpg": ("classification/test.txt", 3),
    "1/11/unknown/a1b2c3d4e5f601.jpg": ("classification/train.txt", -1),
    "2/12/2012/b1b2c3d4e5f602.jpg": ("classification/train.txt", 4),
    "2/12/2012/c1b2c3d4e5f603.jpg": ("classification/test.txt", 2),
    "2/13/2013/d1b2c3d4e5f604.jpg": ("verification/verification_train.txt", 5),
    "2/13/2013/e1b2c3d4e5f605.jpg": ("verification/verification_train.txt", 1),
}


def make_compcars(root: Path) -> Path:
    data = root / "data"
    lists: dict[str, list[str]] = {}
    for i, (rel, (lst, view)) in enumerate(CC_IMAGES.items()):
        img(data / "image" / rel, seed=i)
        write((data / "label" / rel).with_suffix(".txt"), f"{view}\n1\n2 3 10 9\n")
        lists.setdefault(lst, []).append(rel)
    lists["classification/train.txt"].append("2/12/2012/f0000000000000.jpg")  # listed, not shipped
    for lst, rels in lists.items():
        write(data / "train_test_split" / lst, "\n".join(rels) + "\n")
    write(data / "misc/attributes.txt", "model_id maximum_speed displacement door_number seat_number type\n"
          "10 200 1.6 4 5 3\n11 250 2.0 2 4 10\n12 0 0.0 5 7 1\n13 300 3.0 4 5 2\n99 0 0 0 0 0\n")
    makes = np.empty((2, 1), dtype=object)
    makes[:, 0] = ["ABT", "Acura"]
    models = np.empty((14, 1), dtype=object)
    models[:, 0] = [""] * 9 + ["A3 hatchback", "MDX", "RL", "TL", "ZDX"]
    types = np.empty((1, 12), dtype=object)
    types[0, :] = CC_TYPES
    scipy.io.savemat(data / "misc/make_model_name.mat", {"make_names": makes, "model_names": models})
    scipy.io.savemat(data / "misc/car_type.mat", {"types": types})
    return root


def test_compcars(tmp_path: Path) -> None:
    src = make_compcars(tmp_path / "src")
    p = plan_import("compcars", src, NOVAL)
    assert p.meta.splits == ("train", "test") and p.meta.categories == ("ABT", "Acura")
    assert keys(p, "test") == ["2-13-2013-d1b2c3d4e5f604", "2-13-2013-e1b2c3d4e5f605"]
    assert len(keys(p, "train")) == 5 and p.meta.extra["skipped_missing"] == 1
    kinds = {a.name: (a.kind, a.values) for a in p.meta.attributes}
    assert kinds["doors"] == ("categorical", ("2", "4", "5")) and kinds["seats"][1] == ("4", "5", "7")
    assert kinds["type"] == ("categorical", tuple(CC_TYPES)) and kinds["max_speed"][0] == "continuous"
    assert p.meta.extra["normalisation"]["max_speed"] == {"min": 200.0, "max": 300.0, "unit": "km/h"}
    s = by_key(p)["1-11-unknown-a1b2c3d4e5f601"]
    assert (s["instance"], s["category"], s["extra"]["year"], s["extra"]["model_name"]) == ("11", 0, None, "MDX")
    assert s["attributes"] == {"max_speed": 0.5, "displacement": pytest.approx(0.2857142857),
                               "doors": 0, "seats": 0, "type": 9, "viewpoint": None}
    s = by_key(p)["2-12-2012-b1b2c3d4e5f602"]
    assert (s["attributes"]["max_speed"], s["attributes"]["type"], s["attributes"]["viewpoint"]) == (None, 0, 3)
    assert s["extra"]["bbox"] == pytest.approx([1 / 16, 2 / 12, 10 / 16, 9 / 12], abs=1e-6)
    check_all(p)
    off = plan_import("compcars", src, ImportOptions(val_fraction=0, options={"split": "official"}))
    assert keys(off, "test") == ["1-10-2014-07b90decb92ba6", "2-12-2012-c1b2c3d4e5f603"]
    with pytest.raises(ShardError, match=r"f0000000000000\.jpg.*not found"):
        plan_import("compcars", src, ImportOptions(options={"missing": "error"}))
    p = plan_import("compcars", src, ImportOptions())
    assert {s["instance"] for s in p.splits["val"]}.isdisjoint(s["instance"] for s in p.splits["train"])
    roundtrip(p, tmp_path)


def test_compcars_errors(tmp_path: Path) -> None:
    src = make_compcars(tmp_path / "a")
    (src / "data/train_test_split/verification/verification_train.txt").unlink()
    with pytest.raises(ShardError, match=r"verification_train\.txt.*split=official"):
        plan_import("compcars", src, NOVAL)
    src = make_compcars(tmp_path / "b")
    attrs = src / "data/misc/attributes.txt"
    write(attrs, attrs.read_text().replace("11 250 2.0 2 4 10", "11 fast 2.0 2 4 10"))
    with pytest.raises(ShardError, match=r"attributes\.txt:3: maximum_speed 'fast'"):
        plan_import("compcars", src, NOVAL)
    src = make_compcars(tmp_path / "c")
    write(src / "data/train_test_split/classification/test.txt", "1/10/../../../../x.jpg\n")
    with pytest.raises(ShardError, match="not make_id/model_id/year"):
        plan_import("compcars", src, NOVAL)
    write(src / "data/train_test_split/classification/test.txt", "../10/2014/x.jpg\n")
    with pytest.raises(ShardError, match=r"test\.txt:1: make_id '\.\.'"):
        plan_import("compcars", src, NOVAL)


# ------------------------------------------------------------------ generic folder + labels
def make_generic(root: Path, fmt: str = "csv") -> Path:
    rows = [("a.png", "train", "p1", "cat", "1", "0.25", "red"), ("sub/b c.jpg", "train", "p1", "dog", "0", "", "blue"),
            ("c.png", "test", "p2", "cat", "1", "1", "blue"), ("d.jpg", "test", "p3", "dog", "", "0.5", "red")]
    for i, r in enumerate(rows):
        img(root / r[0], seed=i)
    cols = ("path", "split", "instance", "category", "smile", "age", "colour")
    if fmt == "csv":
        write(root / "labels.csv", ",".join(cols) + "\n" + "".join(",".join(r) + "\n" for r in rows))
    else:
        write(root / "labels.jsonl", "".join(json.dumps({c: v for c, v in zip(cols, r)}) + "\n" for r in rows))
    write(root / "pairs.csv", "path_i,path_j,attribute,relation\na.png,sub/b c.jpg,age,more\n"
          "c.png,d.jpg,brightness,similar\n")
    return root


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_generic(tmp_path: Path, fmt: str) -> None:
    src = make_generic(tmp_path / "src", fmt)
    p = plan_import("generic", src, NOVAL)
    assert p.meta.splits == ("train", "test") and p.meta.categories == ("cat", "dog")
    assert [(a.name, a.kind, a.values) for a in p.meta.attributes] == [
        ("smile", "binary", ()), ("age", "continuous", ()), ("colour", "categorical", ("blue", "red")),
        ("brightness", "continuous", ())]
    assert keys(p, "train") == ["a", "sub-b_c"] and keys(p, "test") == ["c", "d"]
    s = by_key(p)["sub-b_c"]
    assert (s["instance"], s["category"], s["attributes"]) == ("p1", 1, {"smile": 0, "age": None, "colour": 0})
    assert [(q.key_i, q.key_j, q.attribute, q.relation, q.split) for q in p.pairs] == [
        ("a", "sub-b_c", "age", "more", "train"), ("c", "d", "brightness", "similar", "test")]
    check_all(p)
    roundtrip(p, tmp_path)


def test_generic_schema_and_errors(tmp_path: Path) -> None:
    src = make_generic(tmp_path / "a")
    write(src / "attributes.json", json.dumps([{"name": "smile", "kind": "binary"}, {"name": "age", "kind": "continuous"},
                                               {"name": "colour", "kind": "categorical", "values": ["red", "blue", "green"]}]))
    with pytest.raises(ShardError, match=r"pairs\.csv:3: column attribute: 'brightness'"):
        plan_import("generic", src, NOVAL)  # with a schema, pair attributes must be declared
    write(src / "pairs.csv", "key_i,key_j,attribute,relation\na,sub-b_c,age,less\n")
    p = plan_import("generic", src, NOVAL)
    assert p.meta.attribute("colour").values == ("red", "blue", "green") and by_key(p)["a"]["attributes"]["colour"] == 0
    write(src / "pairs.csv", "key_i,key_j,attribute,relation\na,sub-b_c,age,bigger\n")
    with pytest.raises(ShardError, match=r"pairs\.csv:2: column relation: 'bigger'"):
        plan_import("generic", src, NOVAL)
    write(src / "pairs.csv", "key_i,key_j,attribute,relation\na,zzz,age,less\n")
    with pytest.raises(ShardError, match=r"pairs\.csv:2: column key_j: image 'zzz'"):
        plan_import("generic", src, NOVAL)
    src = make_generic(tmp_path / "b")
    with pytest.raises(ShardError, match="column 'nope' is not in"):
        plan_import("generic", src, ImportOptions(options={"attributes": "smile,nope"}))
    assert plan_import("generic", src, ImportOptions(options={"attributes": "smile", "pairs": "pairs.csv"})).meta.attribute_names \
        == ("smile", "age", "brightness")
    labels = src / "labels.csv"
    write(labels, labels.read_text().replace("d.jpg,test,p3,dog,,0.5", "d.jpg,test,p3,dog,,7"))
    with pytest.raises(ShardError, match=r"labels\.csv:5: column 'age': value '7'"):
        plan_import("generic", src, NOVAL)
    write(labels, labels.read_text().replace("d.jpg,test,p3,dog,,7", "../d.jpg,test,p3,dog,,0.5"))
    with pytest.raises(ShardError, match="escapes"):
        plan_import("generic", src, NOVAL)
    write(labels, labels.read_text().replace("../d.jpg,test,p3", "d.jpg,test,p3,extra"))
    with pytest.raises(ShardError, match=r"labels\.csv:5: expected 7 fields"):
        plan_import("generic", src, NOVAL)
    labels.unlink()
    with pytest.raises(ShardError, match=r"labels\.csv"):
        plan_import("generic", src, NOVAL)
