"""LFWA (LFWA+) faces with CelebA's 40 binary attributes and identities (Liu et al., ICCV 2015).

Layout implemented: the LFWA+ release of the CelebA team, as read by public loaders (mat73 /
h5py / torch readers of lfw_att_40.mat and indices_train_test.mat):

    lfw_att_40.mat           name      13143-entry cell of image paths relative to lfw/,
                                       'Aaron_Eckhart\\Aaron_Eckhart_0001.jpg' (either slash)
                             label     13143 x 40 of 0/1 (or -1/1, stored as 0/1)
                             AttrName  40-entry cell of attribute names (optional: CelebA's 40)
    indices_train_test.mat   indices_img_train, indices_img_test: 1-based rows of `name`
                             (6,263 train / 6,880 test images, disjoint identities)
    lfw/Aaron_Eckhart/Aaron_Eckhart_0001.jpg ...   (--opt images=DIR for another folder, e.g.
                             lfw-deepfunneled; default: the first of lfw, lfw-deepfunneled found)

The published .mat files are MATLAB v7.3 (HDF5): they are read with h5py when it is installed;
MATLAB v5 copies (e.g. re-saved with '-v7', or scipy.io.savemat) are read with scipy.
Keys are the sanitised file stems ('Aaron_Eckhart_0001'); instance is the person (the folder
name). There is no val split: val takes whole identities from train (val_fraction, seed), so
identities stay disjoint across splits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.format import ShardError
from shards.importers import ImportOptions
from shards.importers.celeba import CELEBA_ATTRIBUTES, binary_meta, carve_groups
from shards.importers.lfw10 import dataset_root, load_mat, mat_field, mat_str, sanitise_key
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ("images",)
VERSION = 1
ATT_FILE, IDX_FILE = "lfw_att_40.mat", "indices_train_test.mat"
IMAGE_DIRS = ("lfw", "lfw-deepfunneled")
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(512)
            return f.read(8) == HDF5_MAGIC
    except OSError:
        return False


def _read_hdf5(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    """MATLAB v7.3: numeric arrays transposed back to MATLAB order; cellstr -> list of str."""
    import numpy as np

    try:
        import h5py
    except ImportError:
        raise ShardError(f"{path}: MATLAB v7.3 (HDF5) file; install h5py (pip install h5py) or re-save it "
                         f"in MATLAB with save(..., '-v7')") from None
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        for name in fields:
            if name not in f:
                continue
            data = f[name]
            if data.dtype == h5py.ref_dtype:
                out[name] = ["".join(map(chr, np.asarray(f[r][()]).flatten())) for r in np.asarray(data).flatten()]
            else:
                out[name] = np.asarray(data[()]).T
    return out


def _read(path: Path, fields: tuple[str, ...]) -> dict[str, Any]:
    if path.is_file() and _is_hdf5(path):
        return _read_hdf5(path, fields)
    return load_mat(path, "copy it from the LFWA+ release into --src")


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    import numpy as np

    root = dataset_root(Path(src), ATT_FILE, ("LFWA+", "LFWA", "lfwa"))
    p_att, p_idx = root / ATT_FILE, root / IDX_FILE
    att = _read(p_att, ("name", "label", "AttrName"))
    idx = _read(p_idx, ("indices_img_train", "indices_img_test"))
    names = [mat_str(x).replace("\\", "/") for x in np.asarray(mat_field(att, "name", p_att), dtype=object).flatten()]
    labels = np.asarray(mat_field(att, "label", p_att), dtype=float)
    if labels.ndim == 2 and labels.shape[0] != len(names) and labels.shape[1] == len(names):
        labels = labels.T
    attrs = (tuple(sanitise_key(mat_str(x)) for x in np.asarray(att["AttrName"], dtype=object).flatten())
             if "AttrName" in att else CELEBA_ATTRIBUTES)
    if labels.shape != (len(names), len(attrs)):
        raise ShardError(f"{p_att}: label is {labels.shape}, expected {len(names)} images x {len(attrs)} attributes")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ShardError(f"{p_att}: label values must be 0/1 (or -1/1)")
    img_opt = opts.options.get("images")
    images = safe_join(root, img_opt or next((d for d in IMAGE_DIRS if (root / d).is_dir()), IMAGE_DIRS[0]),
                       "--opt images (the image folder)" if img_opt else "image folder")
    if not images.is_dir():
        raise ShardError(f"{root}: no image folder ({img_opt or ' or '.join(IMAGE_DIRS)}); unpack LFW there "
                         f"or name the folder with --opt images=DIR")

    rows: dict[str, list[int]] = {}
    for split, field in (("train", "indices_img_train"), ("test", "indices_img_test")):
        for v in np.asarray(mat_field(idx, field, p_idx), dtype=float).flatten():
            if v != int(v) or not 1 <= v <= len(names):
                raise ShardError(f"{p_idx}: {field} holds {v:g}, not a row of {ATT_FILE} (1..{len(names)})")
            rows.setdefault(split, []).append(int(v) - 1)
    listed = [i for r in rows.values() for i in r]
    if len(set(listed)) != len(listed):
        raise ShardError(f"{p_idx}: an image is listed twice in indices_img_train/indices_img_test; re-download it")

    base: dict[int, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for i in sorted(set().union(*rows.values())):
        rel = names[i]
        where = f"{p_att}: name {i + 1} ({rel!r})"
        path = safe_join(images, rel, what=where)
        if not path.is_file():
            raise ShardError(f"{where}: image not found under {images}")
        key = sanitise_key(Path(rel).stem)
        if seen.setdefault(key, i) != i:
            raise ShardError(f"{where}: key {key!r} repeats name {seen[key] + 1}; image file names must be unique")
        person = Path(rel).parent.name or Path(rel).stem.rsplit("_", 1)[0]
        base[i] = {"key": key, "path": str(path), "instance": person, "category": None, "resize": opts.resize,
                   "attributes": {a: int(labels[i, k] > 0) for k, a in enumerate(attrs)}}
    groups: dict[str, list[str]] = {}
    for i in rows.get("train", []):
        groups.setdefault(base[i]["instance"], []).append(base[i]["key"])
    val_keys = carve_groups(groups, opts.val_fraction, opts.seed, "lfwa")
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, members in rows.items():
        for i in members:
            s = "val" if split == "train" and base[i]["key"] in val_keys else split
            splits.setdefault(s, []).append(dict(base[i], split=s))
    for specs in splits.values():
        specs.sort(key=lambda s: s["key"])
    meta = binary_meta("lfwa", attrs, splits, "LFWA: LFW faces with CelebA's 40 binary attributes, "
                       "identity-disjoint train/test", "Liu et al., ICCV 2015 (LFWA+)",
                       extra={"images": images.name})
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=None,
                       fingerprint=fingerprint_of("lfwa", VERSION, opts.resize, opts.seed, opts.val_fraction,
                                                  sorted(opts.options.items())))
