"""LFW-10 relative attributes (Sandeep, Verma & Jawahar, BMVC 2014) -> a shard plan.

Layout implemented (the LFW-10 release as read by public loaders, e.g. the "bable" LFW10Dataset
and the relative-attribute dataset helpers built on kkanshul's STN ranker protocol):

    LFW10/                       (--src may be this folder or its parent)
      images/1.jpg ... 2000.jpg  face crops; file names are what the .mat files refer to
      annotations/{attr}{train|test}.mat   one pair of files per attribute, attr in
          baldhead darkhair eyesopen goodlooking masculinelooking mouthopen smile
          v_teeth vforehead young
        images_compare       N x 3 cell: column 0 unused (pair id), columns 1 and 2 the two
                             image file names ('123.jpg')
        attribute_strengths  N x 4 double: column 0 unused, columns 1..3 the annotator votes for
                             "image 1 stronger", "image 2 stronger", "about the same"

The label of a pair is the argmax of the three vote columns (ties -> the first column), as in
the public loaders: more / less / similar. Images have no per-image value, so every attribute is
declared `continuous` and samples carry no attribute values; the comparisons are the labels.

Splits: an image belongs to the split whose pairs use it (the release has 1000 train and 1000
test images). `val` is carved from the train *pairs* of each attribute (opts.val_fraction,
opts.seed). An image used by pairs of several splits (possible after the val carve, or in any
pair-split dataset) is resolved by `--opt overlap=`:
  duplicate (default)  the image is stored in every split that uses it, as '<key>-<split>' in
                       each (keys are unique across splits; extra['image'] names the image);
                       all pairs are kept (the published protocol splits pairs, not images)
  exclusive            the image goes to the first of test, val, train that uses it; pairs of
                       other splits that use it are dropped (counted in meta.extra)

This module also holds the small helpers the other relative-attribute importers share
(zap50k, shoes, osr): .mat reading, key sanitising, option parsing, pair-split assignment.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

from shards.format import AttributeSpec, DatasetMeta, Pair, ShardError
from shards.importers import ImportOptions
from shards.plan import DatasetPlan, fingerprint_of, load_image_file, safe_join

KNOWN_OPTIONS: tuple[str, ...] = ("overlap",)
VERSION = 1
ATTRIBUTES = ("baldhead", "darkhair", "eyesopen", "goodlooking", "masculinelooking", "mouthopen",
              "smile", "v_teeth", "vforehead", "young")
SPLIT_PRIORITY = ("test", "val", "train")
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")

RawPair = tuple[str, str, str, str]  # key_i, key_j, attribute, relation


# ----------------------------------------------------------------------------- shared helpers
def sanitise_key(text: str) -> str:
    """A shard key from a file stem: letters, digits, '_' and '-' only (no dots)."""
    key = _BAD_KEY_CHARS.sub("_", text)[:200]
    if not key:
        raise ShardError(f"cannot make a sample key from {text!r}")
    return key


def numbered_key(stem: str, width: int) -> str:
    """'123' -> 'img_0123' (zero-padded so keys sort like the numbers); other stems sanitised."""
    return f"img_{int(stem):0{width}d}" if stem.isdigit() else "img_" + sanitise_key(stem)


def load_mat(path: Path, what: str) -> dict[str, Any]:
    """Read a MATLAB v5 file with scipy; ShardError naming the file on any problem."""
    import scipy.io

    if not path.is_file():
        raise ShardError(f"{path}: missing; {what}")
    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise ShardError(f"{path}: MATLAB v7.3 (HDF5) file; re-save it with save(..., '-v7') "
                         f"or install h5py where the importer supports it") from None
    except (ValueError, TypeError, OSError) as e:
        raise ShardError(f"{path}: not a readable MATLAB .mat file ({e}); re-download it") from None


def mat_field(mat: Mapping[str, Any], name: str, path: Path) -> Any:
    if name not in mat:
        fields = sorted(k for k in mat if not k.startswith("__"))
        raise ShardError(f"{path}: no variable {name!r} (has {fields}); is this the right file?")
    return mat[name]


def mat_str(value: Any) -> str:
    """The string inside a loadmat cell element (nested 1-element arrays of str)."""
    import numpy as np

    while isinstance(value, np.ndarray):
        if value.size == 0:
            return ""
        value = value.flat[0] if value.dtype.kind in "OUS" else value.tolist()
    return str(value).strip()


def int_opt(opts: ImportOptions, key: str, default: int, lo: int, hi: int) -> int:
    raw = opts.options.get(key, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ShardError(f"--opt {key}={raw!r}: expected an integer in [{lo}, {hi}]") from None
    if not lo <= value <= hi:
        raise ShardError(f"--opt {key}={value}: expected an integer in [{lo}, {hi}]")
    return value


def check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction < 1.0:
        raise ShardError(f"val_fraction {fraction!r}: expected a number in [0, 1)")
    return fraction


def carve(items: list[Any], fraction: float, seed: int, salt: str) -> tuple[list[Any], list[Any]]:
    """Deterministically move round(fraction * n) of `items` to a held-out list (order kept)."""
    n_out = int(round(check_fraction(fraction) * len(items)))
    if n_out == 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(f"{seed}/{salt}").shuffle(order)
    out = set(order[:min(n_out, len(items) - 1)])
    return ([x for i, x in enumerate(items) if i not in out], [x for i, x in enumerate(items) if i in out])


def assign_pair_splits(raw: Mapping[str, list[RawPair]], policy: str
                       ) -> tuple[dict[str, dict[str, str]], list[Pair], int]:
    """Split membership of images from the pairs that use them; see the module docstring.

    Returns (split -> {sample key -> image key}, pairs over sample keys, pairs dropped). Sample
    keys are unique across splits (the shard format requires it): an image used by one split
    keeps its key, one that `duplicate` stores in several splits becomes '<key>-<split>' in each.
    Pairs that compare an image with itself are dropped too (they carry no ordering).
    """
    order = sorted(raw, key=lambda s: SPLIT_PRIORITY.index(s) if s in SPLIT_PRIORITY else 99)
    used: dict[str, list[str]] = {}
    for split in order:
        for a, b, _, _ in raw[split]:
            for k in (a, b):
                if split not in used.setdefault(k, []):
                    used[k].append(split)
    members: dict[str, dict[str, str]] = {}
    for k, splits in used.items():
        for split in (splits if policy == "duplicate" else splits[:1]):
            members.setdefault(split, {})[k if len(splits) == 1 or policy != "duplicate" else f"{k}-{split}"] = k
    sample_key = {(img, split): key for split, keys in members.items() for key, img in keys.items()}
    if len(sample_key) != len({key for split in members.values() for key in split}):
        raise ShardError("two images map to the same sample key; rename the image files so their stems differ")
    pairs: list[Pair] = []
    dropped = 0
    for split in order:
        for a, b, attr, rel in raw[split]:
            ka, kb = sample_key.get((a, split)), sample_key.get((b, split))
            if a == b or ka is None or kb is None:
                dropped += 1
                continue
            pairs.append(Pair(ka, kb, attr, rel, split))
    return members, pairs, dropped


def overlap_policy(opts: ImportOptions) -> str:
    return opts.opt("overlap", "duplicate", ("duplicate", "exclusive"))


def relative_meta(name: str, attributes: Iterable[str], splits: Iterable[str], description: str,
                  source: str, categories: Iterable[str] = (), extra: Mapping[str, Any] | None = None,
                  attr_note: str = "relative attribute: comparisons only (see pairs)") -> DatasetMeta:
    attrs = [AttributeSpec(a, "continuous", description=attr_note) for a in attributes]
    order = [s for s in ("train", "val", "test") if s in set(splits)] + sorted(set(splits) - {"train", "val", "test"})
    return DatasetMeta(name=name, attributes=tuple(attrs), categories=tuple(categories), splits=tuple(order),
                       description=description, source=source, extra=dict(extra or {}))


def specs_by_split(members: Mapping[str, Mapping[str, str]], base: Mapping[str, Mapping[str, Any]],
                   resize: int | None) -> dict[str, list[dict[str, Any]]]:
    """Per split, the spec dicts of its samples sorted by key (`base`: image key -> spec fields)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for split, keys in members.items():
        specs = []
        for key in sorted(keys):
            spec = dict(base[keys[key]], key=key, split=split, resize=resize)
            if key != keys[key]:
                spec["extra"] = dict(spec.get("extra") or {}, image=keys[key])
            specs.append(spec)
        if specs:
            out[split] = specs
    return out


def dataset_root(src: Path, marker: str, nested: tuple[str, ...]) -> Path:
    """`src` itself, or the one of its `nested` sub-folders that holds `marker`."""
    if (src / marker).exists():
        return src
    for sub in nested:
        if (src / sub / marker).exists():
            return safe_join(src, sub)
    return src


# ----------------------------------------------------------------------------- LFW-10
def _read_pairs(path: Path, attr: str, split: str, images: Path) -> tuple[list[RawPair], dict[str, str]]:
    import numpy as np

    mat = load_mat(path, f"the LFW-10 annotation of {attr!r} ({split}); copy annotations/ from the release")
    names = np.asarray(mat_field(mat, "images_compare", path), dtype=object)
    votes = np.asarray(mat_field(mat, "attribute_strengths", path), dtype=float)
    if names.ndim != 2 or names.shape[1] < 3 or votes.ndim != 2 or votes.shape[1] < 4 or len(names) != len(votes):
        raise ShardError(f"{path}: images_compare must be N x 3 and attribute_strengths N x 4 "
                         f"(got {names.shape} and {votes.shape}); re-download the annotations")
    rows: list[RawPair] = []
    files: dict[str, str] = {}
    for i in range(len(names)):
        pair = []
        for col in (1, 2):
            fname = mat_str(names[i, col])
            if not fname:
                raise ShardError(f"{path}: pair {i + 1}: empty image name in images_compare")
            img = safe_join(images, fname, what=f"{path}: pair {i + 1} image")
            if not img.is_file():
                raise ShardError(f"{path}: pair {i + 1}: image {fname!r} not found under {images}; "
                                 f"copy the release's images/ folder")
            key = numbered_key(Path(fname).stem, 4)
            if files.setdefault(key, str(img)) != str(img):
                raise ShardError(f"{path}: images {files[key]} and {img} map to the same key {key!r}")
            pair.append(key)
        rel = ("more", "less", "similar")[int(np.argmax(votes[i, 1:4]))]
        rows.append((pair[0], pair[1], attr, rel))
    return rows, files


def plan(src: Path, opts: ImportOptions) -> DatasetPlan:
    root = dataset_root(Path(src), "annotations", ("LFW10", "LFW-10"))
    ann, images = root / "annotations", safe_join(root, "images", "image folder")
    if not images.is_dir():
        raise ShardError(f"{images}: missing; --src must hold LFW-10's images/ and annotations/ folders")
    policy = overlap_policy(opts)
    raw: dict[str, list[RawPair]] = {"train": [], "val": [], "test": []}
    files: dict[str, str] = {}
    for attr in ATTRIBUTES:
        for split in ("train", "test"):
            rows, f = _read_pairs(safe_join(root, f"annotations/{attr}{split}.mat"), attr, split, images)
            files.update(f)
            if split == "train":
                rows, held = carve(rows, opts.val_fraction, opts.seed, f"lfw10/{attr}")
                raw["val"].extend(held)
            raw[split].extend(rows)
    members, pairs, dropped = assign_pair_splits({s: r for s, r in raw.items() if r}, policy)
    base = {k: {"path": p, "instance": None, "attributes": {}} for k, p in files.items()}
    splits = specs_by_split(members, base, opts.resize)
    meta = relative_meta("lfw10", ATTRIBUTES, splits, "LFW-10: 2000 faces, 10 relative attributes, 500 "
                         "train and 500 test pairs per attribute", "Sandeep et al., BMVC 2014 (LFW-10)",
                         extra={"overlap": policy, "pairs_dropped": dropped})
    return DatasetPlan(meta=meta, splits=splits, load=load_image_file, pairs=pairs,
                       fingerprint=fingerprint_of("lfw10", VERSION, opts.resize, opts.seed, opts.val_fraction,
                                                  sorted(opts.options.items())))
