"""Attribute importers (lfw10, zap50k, shoes, osr, lfwa, celeba, celeba_hq) on miniature replicas.

Each replica rebuilds the dataset's published file layout inside tmp_path: tiny generated images
under the real file names and the real list/annotation files in their real formats (.mat files
via scipy.io.savemat, v5). The tests check splits, labels, pairs, every loaded sample, the errors
a user can cause, and a round trip through the writer and reader.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import scipy.io
from PIL import Image

from shards.format import ShardError, check_pair, check_sample
from shards.importers import ImportOptions, plan_import
from shards.plan import DatasetPlan

CELEBA40 = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
            "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
            "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
            "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
            "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
LFW10_ATTRS = ("baldhead", "darkhair", "eyesopen", "goodlooking", "masculinelooking", "mouthopen", "smile",
               "v_teeth", "vforehead", "young")


# ----------------------------------------------------------------------------- helpers
def img(path: Path, size: tuple[int, int] = (16, 16), shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade % 256, 80, 160)).save(path, format="JPEG")
    return path


def cell(items: list[Any], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A MATLAB cell array (numpy object array) holding `items`."""
    out = np.empty(shape or (len(items), 1), dtype=object)
    for i, x in enumerate(items):
        out.flat[i] = x
    return out


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def keys(p: DatasetPlan, split: str) -> list[str]:
    return [s["key"] for s in p.splits[split]]


def spec(p: DatasetPlan, key: str) -> dict[str, Any]:
    return next(s for specs in p.splits.values() for s in specs if s["key"] == key)


def check_plan(p: DatasetPlan, src: Path) -> None:
    """Sorted keys, unique across splits, paths inside src, loadable samples, valid pairs."""
    seen: dict[str, str] = {}
    assert set(p.splits) <= set(p.meta.splits)
    for split, specs in p.splits.items():
        ks = [s["key"] for s in specs]
        assert ks == sorted(ks) and ks, split
        for s in specs:
            assert s["split"] == split and s["key"] not in seen
            seen[s["key"]] = split
            assert Path(s["path"]).is_absolute() and src.resolve() in Path(s["path"]).parents
            check_sample(p.load(s), p.meta)
    for n, pair in enumerate(p.pairs or ()):
        check_pair(pair, p.meta, f"pair {n}")
        assert seen[pair.key_i] == pair.split == seen[pair.key_j]


def rel_of(p: DatasetPlan) -> dict[tuple[str, str, str], str]:
    return {(q.key_i, q.key_j, q.attribute): q.relation for q in p.pairs or ()}


# ----------------------------------------------------------------------------- replicas
def lfw10_replica(src: Path, escape: bool = False) -> Path:
    root = src / "LFW10"
    for n in range(1, 7):
        img(root / "images" / f"{n}.jpg", shade=n)
    for a, attr in enumerate(LFW10_ATTRS):
        train = [("1.jpg", "2.jpg", [5, 0, 0]), ("2.jpg", "3.jpg", [0, 4, 1]), ("1.jpg", "3.jpg", [1, 1, 3])]
        test = [("4.jpg", "5.jpg", [3, 2, 0]), ("6.jpg", "4.jpg", [0, 1, 4])]
        if escape and a == 0:
            train[0] = ("../1.jpg", "2.jpg", [5, 0, 0])
        for split, rows in (("train", train), ("test", test)):
            comp = cell([x for i, (f1, f2, _) in enumerate(rows) for x in (str(i + 1), f1, f2)], (len(rows), 3))
            votes = np.array([[i + 1, *v] for i, (_, _, v) in enumerate(rows)], dtype=float)
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(root / "annotations" / f"{attr}{split}.mat",
                             {"images_compare": comp, "attribute_strengths": votes})
    return src


ZAP_PATHS = ["Shoes/Oxfords/Bostonian/100627.72.jpg", "Boots/Ankle/Brand X./7.1.jpg",
             "Sandals/Flat/Teva/300.5.jpg", "Shoes/Loafers/Cole Haan/400.9.jpg", "Slippers/Slipper Heels/Y/5.jpg"]


def zap_replica(src: Path, escape: bool = False) -> Path:
    data = src / "ut-zap50k-data"
    data.mkdir(parents=True)
    paths = list(ZAP_PATHS)
    if escape:
        paths[0] = "../../evil.jpg"
    for i, rel in enumerate(ZAP_PATHS):  # on disk the trailing '.' of a folder is spelled %2E
        img(src / "ut-zap50k-images-square" / rel.replace("X./", "X%2E/"), shade=i)
    scipy.io.savemat(data / "image-path.mat", {"imagepath": cell(paths)})
    # [img1, img2, attribute, winner, confidence, agreement] per attribute
    orders = cell([np.array([[1, 2, a + 1, 1, 0.9, 1.0], [3, 4, a + 1, 2, 0.8, 0.8], [2, 5, a + 1, 1, 0.7, 0.6],
                             [4, 1, a + 1, 2, 0.9, 0.8]], dtype=float) for a in range(4)], (1, 4))
    scipy.io.savemat(data / "zappos-labels.mat", {"mturkOrder": orders})
    tr = cell([cell([np.array([[1], [2]], dtype=float) if s == 0 else np.array([[1], [3]], dtype=float)
                     for s in range(10)], (1, 10)) for _ in range(4)], (1, 4))
    te = cell([cell([np.array([[3], [4]], dtype=float) if s == 0 else np.array([[2], [4]], dtype=float)
                     for s in range(10)], (1, 10)) for _ in range(4)], (1, 4))
    scipy.io.savemat(data / "train-test-splits.mat", {"trainIndexAll": tr, "testIndexAll": te})
    return src


OSR_NAMES = ["coast_a1.jpg", "coast_a2.jpg", "forest_b1.jpg", "forest_b2.jpg", "street_c1.jpg", "street_c2.jpg"]


def osr_replica(src: Path, escape: bool = False) -> Path:
    for i, n in enumerate(OSR_NAMES):
        img(src / "spatial_envelope_256x256_static_8outdoorcategories" / n, shade=i)
    names = ["../" + OSR_NAMES[0]] + OSR_NAMES[1:] if escape else OSR_NAMES
    ordering = np.array([[2, 3, 1], [3, 1, 2], [1, 2, 3], [2, 2, 1], [1, 3, 2], [3, 2, 1]], dtype=float)
    scipy.io.savemat(src / "data.mat", {
        "im_names": cell(names), "class_labels": np.array([[1], [1], [2], [2], [3], [3]], dtype=float),
        "used_for_training": np.array([[1], [0], [1], [0], [1], [0]], dtype=float), "relative_ordering": ordering,
        "attribute_names": cell(["natural", "open", "perspective", "size-large", "diagonal-plane", "depth-close"], (1, 6)),
        "class_names": cell(["coast", "forest", "street"], (1, 3))})
    return src


SHOE_NAMES = ["img_womens_clogs_1.jpg", "img_womens_clogs_2.jpg", "img_womens_pumps_7.jpg", "img_womens_boots_3.jpg"]


def shoes_replica(src: Path, escape: bool = False) -> Path:
    for i, n in enumerate(SHOE_NAMES):
        cat = n[len("img_"):n.rindex("_")]
        img(src / "womens" / cat / "0" / n, shade=i)
    attrs = ["pointy-at-the-front", "open", "bright-in-color", "covered-with-ornaments", "shiny",
             "high-at-the-heel", "long-on-the-leg", "formal", "sporty", "feminine"]
    labels = np.array([[1, 2, 2, 1], [3, 1, 9, 2], [2, 3, 1, 3], [4, 1, 2, 2]], dtype=float)
    names = ["../" + SHOE_NAMES[0]] + SHOE_NAMES[1:] if escape else SHOE_NAMES
    scipy.io.savemat(src / "shoes_attributes.mat", {
        "im_names": cell(names, (1, 4)), "attribute_names": cell(attrs, (1, 10)),
        "class_names": cell(["boots", "clogs", "pumps"], (1, 3)),
        "class_labels": np.array([[2], [2], [3], [1]], dtype=float), "mturk_labels": labels})
    return src


CELEBA_ROWS = {  # file: (partition, identity, first three attribute values)
    "000001.jpg": ("0", "2880", (-1, 1, 1)), "000002.jpg": ("0", "2937", (1, -1, 1)),
    "000003.jpg": ("1", "8692", (-1, -1, -1)), "000004.jpg": ("2", "5805", (1, 1, -1)),
    "000005.jpg": ("2", "2880", (-1, 1, -1))}


def celeba_attr_lines(rows: dict[str, tuple[int, int, int]]) -> list[str]:
    return [str(len(rows)), " ".join(CELEBA40)] + [
        f"{f}  " + " ".join(f"{v:2d}" for v in (*vals, *[-1] * 37)) for f, vals in rows.items()]


def celeba_replica(src: Path, escape: bool = False) -> Path:
    for i, f in enumerate(CELEBA_ROWS):
        img(src / "Img" / "img_align_celeba" / f, (18, 22), shade=i)
        img(src / "Img" / "img_celeba" / f, (40, 20), shade=i)
    write_lines(src / "Anno" / "list_attr_celeba.txt", celeba_attr_lines({f: r[2] for f, r in CELEBA_ROWS.items()}))
    write_lines(src / "Anno" / "identity_CelebA.txt", [f"{f} {r[1]}" for f, r in CELEBA_ROWS.items()])
    write_lines(src / "Anno" / "list_bbox_celeba.txt", ["5", "image_id x_1 y_1 width height"] +
                [f"{f}  10  5  20  10" for f in CELEBA_ROWS])
    parts = [f"{f} {r[0]}" for f, r in CELEBA_ROWS.items()]
    if escape:
        parts[0] = "../000001.jpg 0"
    write_lines(src / "Eval" / "list_eval_partition.txt", parts)
    return src


HQ_MAP = [("0", "119613", "119614.jpg"), ("1", "99094", "099095.jpg"), ("2", "170000", "170001.jpg"),
          ("3", "190000", "190001.jpg")]


def celeba_hq_replica(src: Path, escape: bool = False) -> Path:
    root = src / "CelebAMask-HQ"
    for i, _, _ in HQ_MAP:
        img(root / "CelebA-HQ-img" / f"{i}.jpg", shade=int(i))
    vals = {"0.jpg": (1, -1, 1), "1.jpg": (-1, -1, 1), "2.jpg": (1, 1, 1), "3.jpg": (-1, 1, -1)}
    write_lines(root / "CelebAMask-HQ-attribute-anno.txt", celeba_attr_lines(vals))
    rows = [f"{i} {o} {f}" for i, o, f in HQ_MAP]
    if escape:
        rows[0] = "../0 119613 119614.jpg"
    write_lines(root / "CelebA-HQ-to-CelebA-mapping.txt", ["idx orig_idx orig_file"] + rows)
    write_lines(src / "Anno" / "identity_CelebA.txt", ["119614.jpg 11", "099095.jpg 12", "170001.jpg 13",
                                                        "190001.jpg 11"])
    return src


LFWA_NAMES = ["Aaron_Eckhart\\Aaron_Eckhart_0001.jpg", "Abba_Eban\\Abba_Eban_0001.jpg", "Abba_Eban\\Abba_Eban_0002.jpg",
              "Ada_Lee\\Ada_Lee_0001.jpg", "Bob_Ray\\Bob_Ray_0001.jpg", "Bob_Ray\\Bob_Ray_0002.jpg"]


def lfwa_replica(src: Path, escape: bool = False) -> Path:
    for i, n in enumerate(LFWA_NAMES):
        img(src / "lfw" / n.replace("\\", "/"), (12, 12), shade=i)
    names = ["..\\..\\x.jpg"] + LFWA_NAMES[1:] if escape else LFWA_NAMES
    labels = np.zeros((6, 40))
    labels[0, 20] = labels[3, 31] = labels[4, 0] = 1
    scipy.io.savemat(src / "lfw_att_40.mat", {"name": cell(names), "label": labels, "AttrName": cell(CELEBA40, (1, 40))})
    scipy.io.savemat(src / "indices_train_test.mat", {"indices_img_train": np.array([[1, 2, 3, 5, 6]], dtype=float),
                                                      "indices_img_test": np.array([[4]], dtype=float)})
    return src


REPLICAS: dict[str, tuple[Callable[..., Path], str]] = {  # name -> (replica, an annotation file to delete)
    "lfw10": (lfw10_replica, "LFW10/annotations/smiletest.mat"),
    "zap50k": (zap_replica, "ut-zap50k-data/train-test-splits.mat"),
    "shoes": (shoes_replica, "shoes_attributes.mat"),
    "osr": (osr_replica, "data.mat"),
    "lfwa": (lfwa_replica, "indices_train_test.mat"),
    "celeba": (celeba_replica, "Anno/identity_CelebA.txt"),
    "celeba_hq": (celeba_hq_replica, "CelebAMask-HQ/CelebA-HQ-to-CelebA-mapping.txt"),
}


# ----------------------------------------------------------------------------- per dataset
def test_lfw10_splits_pairs_and_vote_argmax(tmp_path: Path) -> None:
    src = lfw10_replica(tmp_path)
    p = plan_import("lfw10", src, ImportOptions())
    check_plan(p, src)
    assert p.meta.splits == ("train", "test") and p.meta.attribute_names == LFW10_ATTRS
    assert all(a.kind == "continuous" for a in p.meta.attributes)
    assert keys(p, "train") == ["img_0001", "img_0002", "img_0003"]
    assert keys(p, "test") == ["img_0004", "img_0005", "img_0006"]
    assert all(s["attributes"] == {} and s["resize"] is None for specs in p.splits.values() for s in specs)
    rel = rel_of(p)
    assert len(p.pairs) == 50
    for attr in LFW10_ATTRS:
        assert rel[("img_0001", "img_0002", attr)] == "more"      # votes 5/0/0
        assert rel[("img_0002", "img_0003", attr)] == "less"      # votes 0/4/1
        assert rel[("img_0001", "img_0003", attr)] == "similar"   # votes 1/1/3
        assert rel[("img_0004", "img_0005", attr)] == "more"
        assert rel[("img_0006", "img_0004", attr)] == "similar"
    assert {q.split for q in p.pairs if q.key_i == "img_0004"} == {"test"}


def test_lfw10_val_carved_from_train_pairs_and_overlap_policies(tmp_path: Path) -> None:
    src = lfw10_replica(tmp_path)
    dup = plan_import("lfw10", src, ImportOptions(val_fraction=0.5, seed=3))
    check_plan(dup, src)
    assert dup.meta.splits == ("train", "val", "test") and len(dup.pairs) == 50
    n_val = sum(q.split == "val" for q in dup.pairs)
    assert n_val == 20  # 2 of the 3 train pairs of each attribute
    shared = [s for s in dup.splits["val"] if "extra" in s]
    assert shared and all(s["key"] == f"{s['extra']['image']}-val" for s in shared)
    assert dup.meta.extra["pairs_dropped"] == 0
    assert plan_import("lfw10", src, ImportOptions(val_fraction=0.5, seed=3)).pairs == dup.pairs  # deterministic
    exc = plan_import("lfw10", src, ImportOptions(val_fraction=0.5, seed=3, options={"overlap": "exclusive"}))
    check_plan(exc, src)
    assert exc.meta.extra["pairs_dropped"] == 50 - len(exc.pairs) > 0
    assert not any("extra" in s for specs in exc.splits.values() for s in specs)


def test_zap50k_published_split_categories_and_shared_images(tmp_path: Path) -> None:
    src = zap_replica(tmp_path)
    p = plan_import("zap50k", src, ImportOptions())
    check_plan(p, src)
    assert p.meta.attribute_names == ("open", "pointy", "sporty", "comfort")
    assert p.meta.categories == ("Boots", "Sandals", "Shoes", "Slippers")
    # split 1: train rows 1,2 -> images (1,2) (3,4); test rows 3,4 -> (2,5) (4,1): 1, 2, 4 are shared
    assert keys(p, "train") == ["img_00001-train", "img_00002-train", "img_00003", "img_00004-train"]
    assert keys(p, "test") == ["img_00001-test", "img_00002-test", "img_00004-test", "img_00005"]
    rel = rel_of(p)
    assert rel[("img_00001-train", "img_00002-train", "open")] == "more"
    assert rel[("img_00003", "img_00004-train", "comfort")] == "less"
    assert rel[("img_00002-test", "img_00005", "sporty")] == "more"
    assert rel[("img_00004-test", "img_00001-test", "pointy")] == "less"
    first = spec(p, "img_00001-train")
    assert first["instance"] == "100627.72" and first["category"] == 2 and first["extra"]["image"] == "img_00001"
    boots = spec(p, "img_00002-test")  # image-path.mat says 'Brand X.', the disk says 'Brand X%2E'
    assert boots["category"] == 0 and boots["path"].endswith("Brand X%2E/7.1.jpg")
    p2 = plan_import("zap50k", src, ImportOptions(options={"split_index": "2"}))
    # split 2: train rows 1,3 -> (1,2) (2,5); test rows 2,4 -> (3,4) (4,1): only image 1 is shared
    assert {(q.key_i, q.key_j) for q in p2.pairs if q.split == "train"} == {("img_00001-train", "img_00002"),
                                                                            ("img_00002", "img_00005")}
    with pytest.raises(ShardError, match="split_index"):
        plan_import("zap50k", src, ImportOptions(options={"split_index": "11"}))


def test_osr_category_rank_values_and_pairs(tmp_path: Path) -> None:
    src = osr_replica(tmp_path)
    p = plan_import("osr", src, ImportOptions())
    check_plan(p, src)
    assert p.meta.categories == ("coast", "forest", "street")
    assert keys(p, "train") == ["coast_a1", "forest_b1", "street_c1"]
    assert keys(p, "test") == ["coast_a2", "forest_b2", "street_c2"]
    coast, street = spec(p, "coast_a1"), spec(p, "street_c2")
    assert coast["category"] == 0 and coast["attributes"]["natural"] == 0.5 and coast["attributes"]["open"] == 1.0
    assert street["attributes"] == {"natural": 0.0, "open": 0.5, "perspective": 1.0, "size-large": 0.0,
                                    "diagonal-plane": 0.5, "depth-close": 0.0}
    values = {s["key"]: s["attributes"] for specs in p.splits.values() for s in specs}
    assert len(p.pairs) == 36  # 3 pairs per split and attribute
    for q in p.pairs:
        vi, vj = values[q.key_i][q.attribute], values[q.key_j][q.attribute]
        assert q.relation == ("more" if vi > vj else "less" if vi < vj else "similar")
    assert len(plan_import("osr", src, ImportOptions(options={"pairs": "all"})).pairs) == 36
    assert len(plan_import("osr", src, ImportOptions(options={"pairs": "none"})).pairs) == 0
    assert len(plan_import("osr", src, ImportOptions(options={"max_pairs": "1"})).pairs) == 12
    val = plan_import("osr", src, ImportOptions(val_fraction=0.34))
    assert len(val.splits["val"]) == 1 and len(val.splits["train"]) == 2


def test_shoes_crowd_pairs_form_the_test_split(tmp_path: Path) -> None:
    src = shoes_replica(tmp_path)
    p = plan_import("shoes", src, ImportOptions())
    check_plan(p, src)
    assert p.meta.splits == ("test",) and p.meta.categories == ("boots", "clogs", "pumps")
    assert keys(p, "test") == ["img_womens_boots_3", "img_womens_clogs_1", "img_womens_clogs_2", "img_womens_pumps_7"]
    assert rel_of(p) == {("img_womens_clogs_1", "img_womens_clogs_2", "open"): "more",
                         ("img_womens_pumps_7", "img_womens_clogs_1", "sporty"): "less",
                         ("img_womens_clogs_2", "img_womens_pumps_7", "pointy-at-the-front"): "similar",
                         ("img_womens_boots_3", "img_womens_clogs_1", "open"): "less"}
    assert spec(p, "img_womens_pumps_7")["category"] == 2 and spec(p, "img_womens_boots_3")["category"] == 0


def test_celeba_official_partition_identities_and_binary_attributes(tmp_path: Path) -> None:
    src = celeba_replica(tmp_path)
    p = plan_import("celeba", src, ImportOptions(resize=8))
    check_plan(p, src)
    assert p.meta.attribute_names == tuple(CELEBA40) and all(a.kind == "binary" for a in p.meta.attributes)
    assert keys(p, "train") == ["img_000001", "img_000002"] and keys(p, "val") == ["img_000003"]
    assert keys(p, "test") == ["img_000004", "img_000005"]
    s = spec(p, "img_000001")
    assert s["instance"] == "2880" and s["resize"] == 8 and "extra" not in s
    assert (s["attributes"]["5_o_Clock_Shadow"], s["attributes"]["Arched_Eyebrows"], s["attributes"]["Young"]) == (0, 1, 0)
    assert max(Image.open(io.BytesIO(p.load(s).image)).size) == 8
    wild = plan_import("celeba", src, ImportOptions(options={"images": "wild"}))
    check_plan(wild, src)
    assert spec(wild, "img_000004")["extra"] == {"face_box": [0.25, 0.25, 0.75, 0.75]}  # 10,5,20,10 on 40x20


def test_celeba_hq_mapping_partition_and_identities(tmp_path: Path) -> None:
    src = celeba_hq_replica(tmp_path)
    p = plan_import("celeba_hq", src, ImportOptions())
    check_plan(p, src)
    assert keys(p, "train") == ["img_00000", "img_00001"] and keys(p, "val") == ["img_00002"]
    assert keys(p, "test") == ["img_00003"]
    s = spec(p, "img_00000")
    assert s["instance"] == "11" and s["extra"] == {"celeba_file": "119614.jpg"}
    assert (s["attributes"]["5_o_Clock_Shadow"], s["attributes"]["Arched_Eyebrows"]) == (1, 0)
    assert spec(p, "img_00003")["instance"] == "11"
    # the official partition file, when present, decides
    write_lines(src / "Eval" / "list_eval_partition.txt", ["119614.jpg 2", "099095.jpg 0", "170001.jpg 1", "190001.jpg 2"])
    p2 = plan_import("celeba_hq", src, ImportOptions())
    assert keys(p2, "test") == ["img_00000", "img_00003"] and p2.meta.extra["partition"] == "list_eval_partition.txt"
    (src / "Anno" / "identity_CelebA.txt").unlink()
    assert plan_import("celeba_hq", src, ImportOptions(options={"identities": "none"})).splits["val"][0]["instance"] is None


def test_lfwa_identities_labels_and_identity_disjoint_val(tmp_path: Path) -> None:
    src = lfwa_replica(tmp_path)
    p = plan_import("lfwa", src, ImportOptions())
    check_plan(p, src)
    assert keys(p, "test") == ["Ada_Lee_0001"]
    assert keys(p, "train") == ["Aaron_Eckhart_0001", "Abba_Eban_0001", "Abba_Eban_0002", "Bob_Ray_0001", "Bob_Ray_0002"]
    assert spec(p, "Aaron_Eckhart_0001")["attributes"]["Male"] == 1 and spec(p, "Ada_Lee_0001")["attributes"]["Smiling"] == 1
    assert spec(p, "Bob_Ray_0001")["instance"] == "Bob_Ray" and spec(p, "Bob_Ray_0001")["attributes"]["5_o_Clock_Shadow"] == 1
    v = plan_import("lfwa", src, ImportOptions(val_fraction=0.4, seed=1))
    check_plan(v, src)
    ids = {split: {s["instance"] for s in specs} for split, specs in v.splits.items()}
    assert len(v.splits["val"]) >= 2 and not ids["val"] & ids["train"] and not ids["val"] & ids["test"]


# ----------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("name", sorted(REPLICAS))
def test_missing_annotation_file_names_the_file(tmp_path: Path, name: str) -> None:
    make, rel = REPLICAS[name]
    src = make(tmp_path / "src")
    (src / rel).unlink()
    with pytest.raises(ShardError, match=Path(rel).name.replace(".", r"\.")):
        plan_import(name, src, ImportOptions())


ESCAPE_MESSAGE = {"lfw10": "escapes", "zap50k": "escapes", "osr": "escapes", "lfwa": "escapes", "celeba": "escapes",
                  "shoes": "plain file name", "celeba_hq": "not a number"}


@pytest.mark.parametrize("name", sorted(REPLICAS))
def test_path_escaping_src_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "000001.jpg").write_bytes(b"outside")  # a target that exists just outside src
    src = REPLICAS[name][0](tmp_path / "src", escape=True)
    with pytest.raises(ShardError, match=ESCAPE_MESSAGE[name]):
        plan_import(name, src, ImportOptions())


def test_malformed_lines_and_unknown_images_raise_shard_errors(tmp_path: Path) -> None:
    src = celeba_replica(tmp_path / "c")
    lines = (src / "Anno" / "list_attr_celeba.txt").read_text().splitlines()
    write_lines(src / "Anno" / "list_attr_celeba.txt", lines[:3] + [lines[3] + " 1"] + lines[4:])
    with pytest.raises(ShardError, match=r"list_attr_celeba\.txt:4: expected an image name and 40 values"):
        plan_import("celeba", src, ImportOptions())
    write_lines(src / "Anno" / "list_attr_celeba.txt", lines)
    write_lines(src / "Anno" / "identity_CelebA.txt", ["000001.jpg 1"])
    with pytest.raises(ShardError, match=r"identity_CelebA\.txt: has no entry for image '000002\.jpg'"):
        plan_import("celeba", src, ImportOptions())
    lfw = lfw10_replica(tmp_path / "l")
    (lfw / "LFW10" / "images" / "5.jpg").unlink()
    with pytest.raises(ShardError, match=r"baldheadtest\.mat: pair 1: image '5\.jpg' not found"):
        plan_import("lfw10", lfw, ImportOptions())
    zap = zap_replica(tmp_path / "z")
    orders = scipy.io.loadmat(zap / "ut-zap50k-data" / "zappos-labels.mat")["mturkOrder"]
    orders[0, 0][0, 3] = 7
    scipy.io.savemat(zap / "ut-zap50k-data" / "zappos-labels.mat", {"mturkOrder": orders})
    with pytest.raises(ShardError, match=r"zappos-labels\.mat: mturkOrder\{1\} row 1: winner 7"):
        plan_import("zap50k", zap, ImportOptions())
    with pytest.raises(ShardError, match="not an option of osr"):
        plan_import("osr", osr_replica(tmp_path / "o"), ImportOptions(options={"bogus": "1"}))


def _save_v73(path: Path, fields: dict[str, Any]) -> None:
    """Write a MATLAB v7.3-style file: HDF5 after a 512-byte header, arrays transposed,
    cell arrays of strings as object references to uint16 char arrays (as MATLAB does)."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        for name, value in fields.items():
            if isinstance(value, list):
                rs = []
                for i, text in enumerate(value):
                    d = refs.create_dataset(f"{name}_{i}", data=np.array([[ord(c)] for c in text], dtype=np.uint16))
                    rs.append(d.ref)
                f.create_dataset(name, data=np.array([rs], dtype=h5py.ref_dtype))
            else:
                f.create_dataset(name, data=np.asarray(value).T)
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64".ljust(128))


def test_lfwa_reads_matlab_v73_files_like_v5(tmp_path: Path) -> None:
    ref = plan_import("lfwa", lfwa_replica(tmp_path / "v5"), ImportOptions())
    src = lfwa_replica(tmp_path / "v73")
    labels = np.zeros((6, 40))
    labels[0, 20] = labels[3, 31] = labels[4, 0] = 1
    _save_v73(src / "lfw_att_40.mat", {"name": LFWA_NAMES, "label": labels, "AttrName": CELEBA40})
    _save_v73(src / "indices_train_test.mat", {"indices_img_train": np.array([[1, 2, 3, 5, 6]], dtype=float),
                                              "indices_img_test": np.array([[4]], dtype=float)})
    assert (src / "lfw_att_40.mat").read_bytes()[512:520] == b"\x89HDF\r\n\x1a\n"
    got = plan_import("lfwa", src, ImportOptions())
    for split in ref.splits:
        want = [{k: v for k, v in s.items() if k != "path"} for s in ref.splits[split]]
        assert [{k: v for k, v in s.items() if k != "path"} for s in got.splits[split]] == want


# ----------------------------------------------------------------------------- round trip
@pytest.fixture(scope="module")
def shard_io() -> tuple[Any, Any]:
    """The writer and reader (imported once: the reader pulls in torch)."""
    return pytest.importorskip("shards.writer"), pytest.importorskip("shards.reader")


@pytest.mark.parametrize("name", sorted(REPLICAS))
def test_round_trip_through_writer_and_reader(tmp_path: Path, name: str, shard_io: tuple[Any, Any]) -> None:
    writer, reader = shard_io
    src = REPLICAS[name][0](tmp_path / "src")
    p = plan_import(name, src, ImportOptions())
    out = tmp_path / "out"
    manifest = writer.write_dataset(p, out, shard_size=4, workers=1, progress=False)
    for split, specs in p.splits.items():
        got = list(reader.iter_samples(out, split))
        assert [g["key"] for g in got] == [s["key"] for s in specs]
        for g, s in zip(got, specs):
            assert g["label"] == {"split": split, "instance": s.get("instance"), "category": s.get("category"),
                                  "attributes": s["attributes"], "boxes": {}, "extra": s.get("extra", {})}
    if p.pairs:
        assert sum(v["count"] for v in manifest["pair_splits"].values()) == len(p.pairs)
