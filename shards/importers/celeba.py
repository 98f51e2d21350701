"""CelebA (Liu et al., ICCV 2015): 40 binary attributes, identities, official splits -> a shard plan.

Layout implemented: the official release, in either of the two common arrangements (the Google
Drive folders Anno/, Eval/, Img/, or everything flat as torchvision's CelebA loader expects):

    list_attr_celeba.txt      line 1: image count; line 2: the 40 attribute names;
                              then '000001.jpg -1  1  1 -1 ...' (values -1/1; stored as 0/1)
    identity_CelebA.txt       '000001.jpg 2880' (identity id per image)
    list_eval_partition.txt   '000001.jpg 0'  (0 train, 1 val, 2 test)
    list_bbox_celeba.txt      line 1: count; line 2: 'image_id x_1 y_1 width height';
                              then '000001.jpg 95 71 226 313' (pixels, in-the-wild images)
    img_align_celeba/000001.jpg ...   (aligned 178x218 crops; Img/ prefix optional)
    img_celeba/000001.jpg ...         (in-the-wild originals, with --opt images=wild)

Each file is looked for in --src, --src/Anno and --src/Eval. Keys are 'img_000001'; instance is
the identity id; attributes are binary 0/1. The face box in list_bbox_celeba.txt is not an
attribute region, so it is not put in `boxes` (which the format keys by attribute): with
--opt images=wild it goes to extra['face_box'] as [x0, y0, x1, y1] normalised by the image size.
The bbox file describes the in-the-wild images only and is not read for the aligned ones.

This module also holds the CelebA-style parsers shared by celeba_hq and lfwa.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping

from shards.format import AttributeSpec, DatasetMeta, ShardError
from shards.importers import ImportOptions
from shards.importers.lfw10 import check_fraction, numbered_key
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ("images",)
VERSION = 1
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
SPLIT_CODES = {"0": "train", "1": "val", "2": "test"}
BINARY = {"-1": 0, "0": 0, "1": 1}


def find_file(src: Path, name: str, hint: str, subdirs: Iterable[str] = ("", "Anno", "Eval")) -> Path:
    """The first of src/<sub>/<name> that exists, or a ShardError naming the file and `hint`."""
    for sub in subdirs:
        rel = f"{sub}/{name}" if sub else name
        if (Path(src) / rel).is_file():
            return safe_join(src, rel)
    also = ", ".join(s for s in subdirs if s)
    raise ShardError(f"{Path(src) / name}: missing{f' (also looked in {also})' if also else ''}; {hint}")


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def read_attr_list(path: Path) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """CelebA-style attribute list: count line, names line, 'file v1 .. vK' rows (-1/1 -> 0/1)."""
    lines = _lines(path)
    if len(lines) < 2 or len(lines[0][1]) != 1 or not lines[0][1][0].isdigit():
        raise ShardError(f"{path}:1: expected the image count on line 1 and attribute names on line 2")
    names = tuple(lines[1][1])
    rows: dict[str, list[int]] = {}
    for n, parts in lines[2:]:
        if len(parts) != len(names) + 1:
            raise ShardError(f"{path}:{n}: expected an image name and {len(names)} values, got {len(parts)} fields")
        try:
            values = [BINARY[v] for v in parts[1:]]
        except KeyError:
            raise ShardError(f"{path}:{n}: attribute values must be -1 or 1 (or 0/1)") from None
        if parts[0] in rows:
            raise ShardError(f"{path}:{n}: image {parts[0]!r} is listed twice")
        rows[parts[0]] = values
    if int(lines[0][1][0]) != len(rows):
        raise ShardError(f"{path}:1: says {lines[0][1][0]} images but lists {len(rows)}; the file is truncated "
                         f"or edited, re-download it")
    return names, rows


def read_columns(path: Path, n_cols: int, skip: int = 0) -> dict[str, list[str]]:
    """'name v1 .. v{n_cols-1}' rows (after `skip` header lines) -> name -> values."""
    out: dict[str, list[str]] = {}
    for n, parts in _lines(path)[skip:]:
        if len(parts) != n_cols:
            raise ShardError(f"{path}:{n}: expected {n_cols} whitespace-separated fields, got {len(parts)}")
        if parts[0] in out:
            raise ShardError(f"{path}:{n}: {parts[0]!r} is listed twice")
        out[parts[0]] = parts[1:]
    return out


def lookup(table: Mapping[str, Any], name: str, path: Path, where: str) -> Any:
    if name not in table:
        raise ShardError(f"{path}: has no entry for image {name!r} ({where}); the annotation files are from "
                         f"different releases, re-download them together")
    return table[name]


def carve_groups(groups: Mapping[str, list[str]], fraction: float, seed: int, salt: str) -> set[str]:
    """Keys of whole groups (identities), drawn deterministically, making up ~fraction of all keys."""
    total = sum(len(v) for v in groups.values())
    target = int(round(check_fraction(fraction) * total))
    order = sorted(groups)
    random.Random(f"{seed}/{salt}").shuffle(order)
    out: set[str] = set()
    for g in order[:-1] if len(order) > 1 else []:
        if len(out) >= target:
            break
        out.update(groups[g])
    return out


def binary_meta(name: str, attributes: Iterable[str], splits: Iterable[str], description: str, source: str,
                extra: Mapping[str, Any] | None = None) -> DatasetMeta:
    attrs = tuple(AttributeSpec(a, "binary") for a in attributes)
    order = [s for s in ("train", "val", "test") if s in set(splits)]
    return DatasetMeta(name=name, attributes=attrs, categories=(), splits=tuple(order), description=description,
                       source=source, extra=dict(extra or {}))


def image_dir(src: Path, names: tuple[str, ...]) -> Path:
    """The first of the candidate image folders under src that exists."""
    for rel in names:
        if (Path(src) / rel).is_dir():
            return safe_join(src, rel)
    raise ShardError(f"{Path(src)}: no image folder ({' or '.join(names)}); unpack the images into --src")


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    src = Path(src)
    wild = opts.opt("images", "align", ("align", "wild")) == "wild"
    folder = "img_celeba" if wild else "img_align_celeba"
    hint = "copy the CelebA annotation files (Anno/, Eval/) into --src"
    p_attr = find_file(src, "list_attr_celeba.txt", hint)
    p_id = find_file(src, "identity_CelebA.txt", hint)
    p_part = find_file(src, "list_eval_partition.txt", hint)
    names, attrs = read_attr_list(p_attr)
    ids, parts = read_columns(p_id, 2), read_columns(p_part, 2)
    p_box = find_file(src, "list_bbox_celeba.txt", hint) if wild else p_attr
    boxes = read_columns(p_box, 5, skip=2) if wild else {}
    images = image_dir(src, (f"{folder}/{folder}", folder, f"Img/{folder}"))
    present = set(os.listdir(images))
    line_of = {row[0]: n for n, row in _lines(p_part)}  # for errors naming the partition file's line

    splits: dict[str, list[dict[str, Any]]] = {}
    for fname, (code,) in parts.items():
        where = f"listed in {p_part.name}"
        split = SPLIT_CODES.get(code)
        if split is None:
            raise ShardError(f"{p_part}: image {fname!r} has partition {code!r}; expected 0, 1 or 2")
        path = safe_join(images, fname, what=f"{p_part}:{line_of.get(fname, '?')}: image")
        if fname not in present:
            raise ShardError(f"{path}: missing ({where}); unpack all of {folder} into --src")
        values = lookup(attrs, fname, p_attr, where)
        spec: dict[str, Any] = {"key": numbered_key(Path(fname).stem, 6), "split": split, "path": str(path),
                                "instance": lookup(ids, fname, p_id, where)[0], "category": None,
                                "attributes": dict(zip(names, values)), "resize": opts.resize}
        if wild:
            spec["extra"] = {"face_box": face_box(lookup(boxes, fname, p_box, where), Path(spec["path"]), p_box)}
        splits.setdefault(split, []).append(spec)
    for specs in splits.values():
        specs.sort(key=lambda s: s["key"])
    meta = binary_meta("celeba", names, splits, "CelebA: 202,599 faces, 10,177 identities, 40 binary "
                       "attributes, official train/val/test partition", "Liu et al., ICCV 2015 (CelebA)",
                       extra={"images": folder})
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=None,
                       fingerprint=fingerprint_of("celeba", VERSION, opts.resize, sorted(opts.options.items())))


def face_box(values: list[str], image: Path, source: Path) -> list[float]:
    """'x y w h' in pixels -> [x0, y0, x1, y1] normalised by the image size (clipped to [0, 1])."""
    from PIL import Image, UnidentifiedImageError

    try:
        x, y, w, h = (float(v) for v in values)
    except ValueError:
        raise ShardError(f"{source}: box {values} for {image.name} is not four numbers") from None
    try:
        with Image.open(image) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError) as e:
        raise ShardError(f"{image}: cannot read the image size ({e})") from None
    clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
    return [clip(x / width), clip(y / height), clip((x + w) / width), clip((y + h) / height)]
