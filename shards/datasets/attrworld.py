"""attrworld: procedurally rendered face-like images with known attribute strengths and regions.

Identities have fixed traits (head shape, ears, skin, hair style and colour, eye colour, feature
placement, base attribute levels) and are rendered many times under pose, scale, position,
lighting, clutter, blur, noise and JPEG jitter. Continuous attributes (values in [0, 1]):
smile (mouth), eye_open (eyes), brow_thick (brows), hair_dark (hair), beard (jaw), nose_size
(nose) and the global face_width (head aspect); binary glasses and hat; categorical hair_style.
Every localised attribute has its ground-truth box in each sample. Categories: 4 head shapes x
2 ear types. Splits: train/val/test by image over the seen identities; query/gallery over the
held-out identities (zero-shot retrieval). See shards/DATASETS.md.

The renderer lives in shards/datasets/attrworld_render.py.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from shards.datasets import BuildOptions, knob_number, knob_range
from shards.datasets.attrworld_render import (
    BINARY, CATEGORIES, CONTINUOUS, EARS, GENERATOR_VERSION, HAIR_STYLES, REGION_OF, SHAPES,
    identity_params, image_attributes, render,
)
from shards.format import AttributeSpec, DatasetMeta, Pair, Sample, ShardError, pairs_from_values
from shards.plan import DatasetPlan, encode_image, fingerprint_of

NAME = "attrworld"
DEFAULT_SIZE = 64
DEFAULT_COUNT = 6000
SIZE_RANGE = (32, 256)
QUERIES_PER_IDENTITY = 2
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / val / test, per seen identity, by image

# knob -> (default, description). Values are parsed and range-checked in _knobs().
KNOBS: dict[str, tuple[Any, str]] = {
    "face_scale": ((0.42, 0.62), "min,max head height (chin to crown) as a fraction of the canvas"),
    "region_scale": (1.0, "size of eyes, brows, nose and mouth relative to the head (0.5..1.5)"),
    "rotation": (12.0, "max in-plane head rotation in degrees (uniform +-)"),
    "clutter": (14.0, "mean number of background shapes/textures (some face-coloured); 0 = plain"),
    "noise": (0.03, "Gaussian pixel noise std as a fraction of 255 (per image x U(0.5, 1.5))"),
    "blur": (0.6, "max Gaussian blur sigma in output pixels (per image x U(0, 1))"),
    "jpeg": (90, "JPEG quality 1..100, or 0 for lossless PNG"),
    "lighting": (1.0, "lighting jitter strength: gain +-25%, gradient up to 50%, tint +-8% at 1"),
    "subtlety": (0.3, "0..1: shrinks the visual range of every attribute about its middle (1 = invisible)"),
    "identities": (None, "number of identities (default: ceil(count / images_per_identity))"),
    "images_per_identity": (20, "images rendered per identity (>= 3)"),
    "tau": (0.15, "ordered pair when |v_i - v_j| >= tau"),
    "tau_sim": (0.03, "'similar' pair when |v_i - v_j| < tau_sim"),
    "pairs_per_attribute": (1500, "max train pairs per continuous attribute (val/test get a third)"),
    "unseen_fraction": (0.2, "fraction of identities held out for the query/gallery splits"),
}
KNOWN_OPTIONS = tuple(KNOBS)


def _knobs(opts: BuildOptions) -> dict[str, Any]:
    o = dict(opts.options)
    k: dict[str, Any] = {}
    k["face_scale"] = knob_range(o, KNOBS, "face_scale", 0.2, 0.8)
    k["region_scale"] = knob_number(o, KNOBS, "region_scale", float, 0.5, 1.5)
    k["rotation"] = knob_number(o, KNOBS, "rotation", float, 0.0, 45.0)
    k["clutter"] = knob_number(o, KNOBS, "clutter", float, 0.0, 100.0)
    k["noise"] = knob_number(o, KNOBS, "noise", float, 0.0, 0.5)
    k["blur"] = knob_number(o, KNOBS, "blur", float, 0.0, 5.0)
    k["jpeg"] = knob_number(o, KNOBS, "jpeg", int, 0, 100)
    k["lighting"] = knob_number(o, KNOBS, "lighting", float, 0.0, 1.0)
    k["subtlety"] = knob_number(o, KNOBS, "subtlety", float, 0.0, 0.95)
    k["images_per_identity"] = knob_number(o, KNOBS, "images_per_identity", int, 3, 999)
    k["identities"] = knob_number(o, KNOBS, "identities", int, 2, 99999) if o.get("identities") is not None else None
    k["tau"] = knob_number(o, KNOBS, "tau", float, 0.0, 1.0)
    k["tau_sim"] = knob_number(o, KNOBS, "tau_sim", float, 0.0, 1.0)
    if k["tau_sim"] > k["tau"]:
        raise ShardError(f"--opt tau_sim={k['tau_sim']}: must not exceed tau={k['tau']}")
    k["pairs_per_attribute"] = knob_number(o, KNOBS, "pairs_per_attribute", int, 0, 10_000_000)
    k["unseen_fraction"] = knob_number(o, KNOBS, "unseen_fraction", float, 0.0, 0.9)
    return k


def _counts(opts: BuildOptions, k: dict[str, Any]) -> tuple[int, list[int]]:
    """(count, images per identity list) from --count and the identities / images_per_identity knobs."""
    ipi = k["images_per_identity"]
    explicit_ipi = "images_per_identity" in opts.options
    n_id = k["identities"]
    if opts.count is not None and opts.count < 1:
        raise ShardError(f"--count {opts.count}: must be positive")
    if n_id is None:
        count = opts.count if opts.count is not None else DEFAULT_COUNT
        n_id = max(2, math.ceil(count / ipi))
    else:
        count = opts.count if opts.count is not None else n_id * ipi
        if explicit_ipi and opts.count is not None and count != n_id * ipi:
            raise ShardError(f"--count {count} disagrees with identities={n_id} x images_per_identity={ipi}; "
                             "give at most two of the three")
    base, extra = divmod(count, n_id)
    if base < 3:
        raise ShardError(f"--count {count} over {n_id} identities leaves < 3 images per identity; "
                         "raise --count or lower --opt identities")
    return count, [base + (1 if i < extra else 0) for i in range(n_id)]


def _split_identities(seed: int, per_id: list[int], unseen_fraction: float):
    n_id = len(per_id)
    n_unseen = int(round(unseen_fraction * n_id))
    if unseen_fraction > 0:
        n_unseen = max(2, n_unseen)
    if n_id - n_unseen < 2:
        raise ShardError(f"{n_id} identities with --opt unseen_fraction={unseen_fraction} leave fewer than 2 seen "
                         "identities (a small --count makes few identities); raise --count or --opt identities, "
                         "or lower --opt unseen_fraction")
    perm = np.random.default_rng([int(seed), 21]).permutation(n_id)
    unseen = set(int(i) for i in perm[:n_unseen])
    assign: dict[tuple[int, int], str] = {}
    for ident, n in enumerate(per_id):
        order = [int(i) for i in np.random.default_rng([int(seed), 22, ident]).permutation(n)]
        if ident in unseen:
            for r, img in enumerate(order):
                assign[(ident, img)] = "query" if r < QUERIES_PER_IDENTITY else "gallery"
        else:
            n_val = max(1, int(round(SPLIT_FRACTIONS[1] * n)))
            n_test = max(1, int(round(SPLIT_FRACTIONS[2] * n)))
            for r, img in enumerate(order):
                assign[(ident, img)] = "val" if r < n_val else "test" if r < n_val + n_test else "train"
    return sorted(unseen), assign


def _render_cfg(size: int, k: dict[str, Any]) -> dict[str, Any]:
    keys = ("blur", "clutter", "face_scale", "jpeg", "lighting", "noise", "region_scale", "rotation", "subtlety")
    d = {key: k[key] for key in keys}
    d["size"] = size
    return dict(sorted(d.items()))


def make_spec(seed: int, ident: int, img: int, split: str, cfg: Mapping[str, Any],
              attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec of one image (attributes default to the ground truth of (seed, ident, img))."""
    attrs = dict(attributes) if attributes is not None else image_attributes(seed, ident, img)
    p = identity_params(seed, ident)
    return {
        "attributes": dict(sorted(attrs.items())),
        "category": p["shape"] * len(EARS) + p["ear"],
        "cfg": dict(cfg),
        "id": int(ident),
        "img": int(img),
        "key": f"aw{ident:05d}-{img:03d}",
        "seed": int(seed),
        "split": split,
    }


def load(spec: Mapping[str, Any]) -> Sample:
    """Render one spec (deterministic: the same spec always gives the same bytes)."""
    cfg = spec["cfg"]
    arr, boxes, extra = render(spec["seed"], spec["id"], spec["img"], spec["attributes"], cfg)
    q = int(cfg["jpeg"])
    ext = "jpg" if q > 0 else "png"
    data = encode_image(arr, ext, quality=q if q > 0 else 95)
    extra = dict(extra)
    extra["identity"] = int(spec["id"])
    extra["hair_style"] = HAIR_STYLES[int(spec["attributes"]["hair_style"])]
    return Sample(key=spec["key"], image=data, ext=ext, split=spec["split"], instance=f"id{spec['id']:05d}",
                  category=int(spec["category"]), attributes=dict(spec["attributes"]), boxes=boxes, extra=extra)


def _meta(k: dict[str, Any], size: int, count: int, per_id: list[int], unseen: list[int],
          split_counts: dict[str, int]) -> DatasetMeta:
    desc = {
        "smile": "mouth curvature (corners up) and opening; 0 = slight frown, 1 = open smile",
        "eye_open": "eyelid opening; 0 = nearly closed, 1 = wide open",
        "brow_thick": "eyebrow thickness",
        "hair_dark": "hair darkness (hue is a fixed identity trait)",
        "beard": "beard density on the jaw (shading + stipple)",
        "nose_size": "nose size",
        "face_width": "head width / height (global, no box)",
        "glasses": "wears glasses (identity trait, flipped on 8% of images)",
        "hat": "wears a hat (per image, 20%)",
        "hair_style": "hair style (identity trait)",
    }
    attrs = [AttributeSpec(a, "continuous", localised=a in REGION_OF, description=desc[a]) for a in CONTINUOUS]
    attrs += [AttributeSpec(a, "binary", localised=True, description=desc[a]) for a in BINARY]
    attrs.append(AttributeSpec("hair_style", "categorical", values=HAIR_STYLES, localised=True,
                               description=desc["hair_style"]))
    extra = {
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "count": count,
        "options": {key: k[key] for key in sorted(k)},
        "identities": {"total": len(per_id), "seen": len(per_id) - len(unseen), "unseen": len(unseen),
                       "unseen_ids": unseen},
        "split_counts": split_counts,
        "split_protocol": (
            "train/val/test: images of the seen identities, split per identity by image "
            f"{SPLIT_FRACTIONS[0]:.0%}/{SPLIT_FRACTIONS[1]:.0%}/{SPLIT_FRACTIONS[2]:.0%} (at least 1 val and 1 test "
            f"image each); query/gallery: the held-out identities (unseen_fraction), {QUERIES_PER_IDENTITY} "
            "query images per identity, the rest gallery; instance = identity (zero-shot instance retrieval "
            "query -> gallery); categories are shared by seen and unseen identities"),
        "pairs_protocol": ("per continuous attribute and split train/val/test: random image pairs, 'more'/'less' "
                           "when |diff| >= tau, 'similar' when |diff| < tau_sim, others skipped; at most "
                           "pairs_per_attribute for train and a third of it for val/test, and never more than a "
                           "quarter of all image pairs of the split"),
        "regions": {a: REGION_OF.get(a, "global") for a in CONTINUOUS + BINARY + ("hair_style",)},
        "value_model": ("identity traits (brow_thick, hair_dark, beard, nose_size, face_width) = identity base + "
                        "N(0, 0.04) per image; expressions (smile, eye_open) = 0.3 base + 0.7 U(0, 1) per image; "
                        "values clipped to [0, 1], rounded to 4 decimals"),
        "categories": {"shapes": list(SHAPES), "ears": list(EARS), "index": "shape * 2 + ear"},
    }
    return DatasetMeta(
        name=NAME, attributes=tuple(attrs), categories=CATEGORIES,
        splits=("train", "val", "test", "query", "gallery"),
        description="procedural face-like images: localised and global relative attributes, identities, categories",
        source=f"generated by shards.datasets.attrworld ({GENERATOR_VERSION})", extra=extra)


def plan(opts: BuildOptions) -> DatasetPlan:
    size = DEFAULT_SIZE if opts.size is None else int(opts.size)
    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise ShardError(f"--size {size}: attrworld renders {SIZE_RANGE[0]}..{SIZE_RANGE[1]} px images")
    k = _knobs(opts)
    seed = int(opts.seed)
    count, per_id = _counts(opts, k)
    k["identities"] = len(per_id)
    unseen, assign = _split_identities(seed, per_id, k["unseen_fraction"])
    cfg = _render_cfg(size, k)
    splits: dict[str, list[dict[str, Any]]] = {s: [] for s in ("train", "val", "test", "query", "gallery")}
    for ident, n in enumerate(per_id):
        for img in range(n):
            split = assign[(ident, img)]
            splits[split].append(make_spec(seed, ident, img, split, cfg))
    for s in splits:
        splits[s].sort(key=lambda d: d["key"])
    pairs: list[Pair] = []
    ppa = k["pairs_per_attribute"]
    for split, n_pairs in (("train", ppa), ("val", ppa // 3), ("test", ppa // 3)):
        keys = [d["key"] for d in splits[split]]
        n_pairs = min(n_pairs, len(keys) * (len(keys) - 1) // 4)  # tiny splits: a quarter of all pairs at most
        for a in CONTINUOUS:
            vals = [d["attributes"][a] for d in splits[split]]
            pairs += pairs_from_values(keys, vals, a, split, k["tau"], k["tau_sim"], n_pairs, seed)
    meta = _meta(k, size, count, per_id, unseen, {s: len(v) for s, v in splits.items()})
    fp = fingerprint_of(NAME, GENERATOR_VERSION, seed, size, count, {key: k[key] for key in sorted(k)})
    return DatasetPlan(meta=meta, splits=splits, load=load, pairs=pairs, fingerprint=fp)
