"""CelebA-HQ in the CelebAMask-HQ layout (Lee et al., CVPR 2020), with CelebA identities.

Layout implemented (the CelebAMask-HQ release; the HQ -> CelebA mapping and the split rule are
those of its face_parsing/Data_preprocessing/g_partition.py and of public CelebA-HQ loaders):

    CelebAMask-HQ/                         (--src may be this folder or its parent)
      CelebA-HQ-img/0.jpg ... 29999.jpg
      CelebAMask-HQ-attribute-anno.txt     line 1: 30000; line 2: the 40 CelebA attribute
                                           names; then '0.jpg  1 -1 ...' (-1/1, stored as 0/1)
      CelebA-HQ-to-CelebA-mapping.txt      header 'idx orig_idx orig_file', then
                                           '0 119613 119614.jpg' (HQ index -> CelebA file)
    and, from CelebA (in --src, its Anno/ or Eval/, or --opt celeba_dir=DIR):
      identity_CelebA.txt                  identities (required unless --opt identities=none)
      list_eval_partition.txt              optional: the split of the original CelebA file

Splits follow CelebA's official partition of each image's original file (24,183 / 2,993 / 2,824):
from list_eval_partition.txt when present, else from the partition's published file ranges
(000001-162770 train, 162771-182637 val, 182638-202599 test). Keys are 'img_00000' (the HQ
index), instance the CelebA identity, extra['celeba_file'] the original CelebA file name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.format import ShardError
from shards.importers import ImportOptions
from shards.importers.celeba import (SPLIT_CODES, binary_meta, find_file, image_dir, lookup, read_attr_list,
                                     read_columns)
from shards.importers.lfw10 import dataset_root, numbered_key
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ("celeba_dir", "identities")
VERSION = 1
ATTR_FILE = "CelebAMask-HQ-attribute-anno.txt"
MAP_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
VAL_FIRST, TEST_FIRST = 162771, 182638  # first CelebA file numbers of the val and test partitions


def _split_by_number(fname: str, where: str) -> str:
    stem = Path(fname).stem
    if not stem.isdigit():
        raise ShardError(f"{where}: CelebA file {fname!r} is not numbered; add list_eval_partition.txt")
    n = int(stem)
    return "train" if n < VAL_FIRST else "val" if n < TEST_FIRST else "test"


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    root = dataset_root(Path(src), "CelebA-HQ-img", ("CelebAMask-HQ",))
    with_ids = opts.opt("identities", "required", ("required", "none")) == "required"
    if "celeba_dir" in opts.options:
        celeba = Path(opts.options["celeba_dir"]).expanduser()
        if not celeba.is_dir():
            raise ShardError(f"--opt celeba_dir={celeba}: not a directory; point it at the CelebA annotations")
    else:  # --src itself, or the CelebAMask-HQ folder inside it
        celeba = next((d for d in (Path(src), root) if (d / "identity_CelebA.txt").is_file()
                       or (d / "Anno" / "identity_CelebA.txt").is_file()), Path(src))
    hint = "copy it from the CelebAMask-HQ release into --src"
    names, attrs = read_attr_list(find_file(root, ATTR_FILE, hint, ("",)))
    p_attr = root / ATTR_FILE
    p_map = find_file(root, MAP_FILE, hint, ("",))
    mapping = read_columns(p_map, 3, skip=1)
    c_hint = "copy it from CelebA's Anno/ into --src or name the folder with --opt celeba_dir=DIR"
    p_id = find_file(celeba, "identity_CelebA.txt", c_hint + " (or --opt identities=none)") if with_ids else None
    ids = read_columns(p_id, 2) if p_id else {}
    try:
        p_part: Path | None = find_file(celeba, "list_eval_partition.txt", c_hint)
    except ShardError:
        p_part = None
    parts = read_columns(p_part, 2) if p_part else {}
    images = image_dir(root, ("CelebA-HQ-img",))

    splits: dict[str, list[dict[str, Any]]] = {}
    for idx, (_, orig) in mapping.items():
        where = f"{p_map.name} row {idx}"
        if not idx.isdigit():
            raise ShardError(f"{p_map}: HQ index {idx!r} is not a number; expected 'idx orig_idx orig_file' rows")
        fname = f"{int(idx)}.jpg"
        path = safe_join(images, fname, what=f"{p_map}: image")
        if not path.is_file():
            raise ShardError(f"{path}: missing ({where}); unpack all of CelebA-HQ-img into --src")
        if p_part:
            code = lookup(parts, orig, p_part, where)[0]
            if code not in SPLIT_CODES:
                raise ShardError(f"{p_part}: image {orig!r} has partition {code!r}; expected 0, 1 or 2")
            split = SPLIT_CODES[code]
        else:
            split = _split_by_number(orig, f"{p_map}: {where}")
        splits.setdefault(split, []).append({
            "key": numbered_key(idx, 5), "split": split, "path": str(path),
            "instance": lookup(ids, orig, p_id, where)[0] if p_id else None, "category": None,
            "attributes": dict(zip(names, lookup(attrs, fname, p_attr, where))),
            "extra": {"celeba_file": orig}, "resize": opts.resize})
    for specs in splits.values():
        specs.sort(key=lambda s: s["key"])
    meta = binary_meta("celeba_hq", names, splits, "CelebA-HQ (30,000 faces, CelebAMask-HQ release) with "
                       "CelebA's 40 attributes, identities and partition", "Karras et al., ICLR 2018; "
                       "Lee et al., CVPR 2020 (CelebAMask-HQ)",
                       extra={"partition": "list_eval_partition.txt" if p_part else "CelebA file ranges"})
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=None,
                       fingerprint=fingerprint_of("celeba_hq", VERSION, opts.resize, sorted(opts.options.items())))
