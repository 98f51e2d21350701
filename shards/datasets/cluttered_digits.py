"""cluttered_digits: scikit-learn's 1797 real 8x8 digits, scaled onto cluttered RGB canvases.

Each image shows one source digit (sklearn.datasets.load_digits, 16 grey levels, shipped in the
wheel: no download) scaled 3-4x with jitter, slightly rotated, at a random position, over
fragments (random crops) of other digits, a textured background and pixel noise.

Zero-shot split (the metric-learning protocol of DeML and friends): classes 0-4 are seen
(split by *source digit* into train / val), classes 5-9 form 'test', where evaluation uses the
test split as both query and gallery (Recall@K excluding the query itself).
--opt mode=colour: the ink takes one of 4 colours per source digit and categories become
digit x colour (40 classes); half of them (2 colours per digit, each colour on 5 digits) are
seen in train/val, the other half only in test (compositional zero-shot).
instance = the source digit index, so the 2-3 renders of one source digit are one instance.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from PIL import Image

from shards.datasets import BuildOptions, knob_number, knob_range
from shards.format import AttributeSpec, DatasetMeta, Sample, ShardError
from shards.plan import DatasetPlan, encode_image, fingerprint_of

NAME = "cluttered_digits"
GENERATOR_VERSION = "cluttered_digits/1"
DEFAULT_SIZE = 64
DEFAULT_COUNT = 4000
SIZE_RANGE = (40, 256)
SEEN_CLASSES = (0, 1, 2, 3, 4)
COLOURS = (("red", (230, 60, 50)), ("green", (60, 200, 70)), ("blue", (60, 110, 240)), ("yellow", (235, 215, 50)))

KNOBS: dict[str, tuple[Any, str]] = {
    "mode": ("grey", "grey (10 digit classes) or colour (digit x 4 ink colours = 40 classes)"),
    "scale": ((3.0, 4.0), "min,max digit scale factor (8 px source -> 24..32 px at the default)"),
    "rotation": (10.0, "max digit rotation in degrees (uniform +-)"),
    "clutter": (6, "number of fragments of other digits per image (per image x U(0.5, 1.5))"),
    "fragment": (0.5, "fragment side as a fraction of a digit (random crops of 8x8 sources)"),
    "noise": (0.05, "Gaussian pixel noise std as a fraction of 255"),
    "jpeg": (0, "JPEG quality 1..100, or 0 for lossless PNG"),
    "val_fraction": (0.1, "fraction of the seen source digits held out as 'val'"),
}
KNOWN_OPTIONS = tuple(KNOBS)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    images.setflags(write=False)
    return images, d.target.astype(int)


def _knobs(opts: BuildOptions) -> dict[str, Any]:
    o = dict(opts.options)
    mode = o.get("mode", "grey")
    if mode not in ("grey", "colour"):
        raise ShardError(f"--opt mode={mode}: choose grey or colour")
    return {
        "mode": mode,
        "scale": knob_range(o, KNOBS, "scale", 1.0, 8.0),
        "rotation": knob_number(o, KNOBS, "rotation", float, 0.0, 45.0),
        "clutter": knob_number(o, KNOBS, "clutter", int, 0, 50),
        "fragment": knob_number(o, KNOBS, "fragment", float, 0.2, 1.0),
        "noise": knob_number(o, KNOBS, "noise", float, 0.0, 0.5),
        "jpeg": knob_number(o, KNOBS, "jpeg", int, 0, 100),
        "val_fraction": knob_number(o, KNOBS, "val_fraction", float, 0.0, 0.5),
    }


def seen_colour(digit: int, colour: int, seed: int) -> bool:
    """Colour mode: is class (digit, colour) seen in train? 2 colours per digit, 5 digits per colour."""
    return (digit + colour + seed) % 2 == 0


def load(spec: Mapping[str, Any]) -> Sample:
    """Render one spec deterministically (all randomness from default_rng([seed, idx, rep]))."""
    images, targets = _digits()
    cfg = spec["cfg"]
    size = int(cfg["size"])
    idx, rep, seed = int(spec["idx"]), int(spec["rep"]), int(spec["seed"])
    r = np.random.default_rng([seed, 31, idx, rep])
    u = r.random(12)
    colour_mode = cfg["mode"] == "colour"

    # background: smooth two-tone gradient, darker than the ink
    base = (0.05 + 0.3 * u[0]) * 255
    tint = (r.random(3) - 0.5) * (60 if colour_mode else 20)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ang = 2 * math.pi * u[1]
    canvas = base + 40 * u[2] * (math.cos(ang) * xx + math.sin(ang) * yy)[..., None] + tint.astype(np.float32)
    canvas = np.broadcast_to(canvas, (size, size, 3)).astype(np.float32)

    def paste(glyph: np.ndarray, scale: float, angle: float, x: float, y: float, colour: np.ndarray) -> tuple:
        h, w = glyph.shape
        im = Image.fromarray((glyph * 255).astype(np.uint8), "L")
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        im = im.rotate(angle, resample=Image.BILINEAR, expand=True)
        m = np.asarray(im, np.float32) / 255.0
        gh, gw = m.shape
        x0, y0 = int(round(x - gw / 2)), int(round(y - gh / 2))
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(size, x0 + gw), min(size, y0 + gh)
        if cx1 <= cx0 or cy1 <= cy0:
            return (0.0, 0.0, 0.0, 0.0)
        a = m[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0, None]
        canvas[cy0:cy1, cx0:cx1] = canvas[cy0:cy1, cx0:cx1] * (1 - a) + colour * a
        return (cx0, cy0, cx1, cy1)

    smin, smax = cfg["scale"]
    frag = float(cfg["fragment"])
    n_frag = int(round(int(cfg["clutter"]) * (0.5 + u[3])))
    palette = np.array([c for _, c in COLOURS], np.float32)
    for k in range(n_frag):
        f = r.random(8)
        other = int(r.integers(0, len(images) - 1))
        other += other >= idx  # never the source digit itself
        side = max(2, int(round(8 * frag * (0.7 + 0.6 * f[0]))))
        ox, oy = int(f[1] * (9 - side)), int(f[2] * (9 - side))
        glyph = images[other][oy:oy + side, ox:ox + side]
        if colour_mode:
            col = palette[int(f[3] * len(palette)) % len(palette)] * (0.7 + 0.3 * f[4])
        else:
            col = np.full(3, 255 * (0.55 + 0.45 * f[4]), np.float32)
        paste(glyph, smin + (smax - smin) * f[5], (2 * f[6] - 1) * 45, f[7] * size, r.random() * size, col)

    scale = smin + (smax - smin) * u[4]
    half = 4 * scale * 1.2
    x = half + (size - 2 * half) * u[5] if size > 2 * half else size / 2
    y = half + (size - 2 * half) * u[6] if size > 2 * half else size / 2
    if colour_mode:
        ink = palette[int(spec["colour"])] * (0.85 + 0.15 * u[7])
    else:
        ink = np.full(3, 255 * (0.8 + 0.2 * u[7]), np.float32)
    box = paste(images[idx], scale, float(cfg["rotation"]) * (2 * u[8] - 1), x, y, ink)

    noise = float(cfg["noise"]) * 255
    if noise > 0:
        canvas = canvas + r.standard_normal(canvas.shape, dtype=np.float32) * np.float32(noise)
    arr = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    q = int(cfg["jpeg"])
    ext = "jpg" if q > 0 else "png"
    boxes = {"ink": tuple(round(v / size, 5) for v in box)}
    return Sample(key=spec["key"], image=encode_image(arr, ext, quality=q or 95), ext=ext, split=spec["split"],
                  instance=str(idx), category=int(spec["category"]),
                  attributes={"ink": spec["ink"]}, boxes=boxes,
                  extra={"digit": int(targets[idx]), "scale": round(float(scale), 4), "fragments": n_frag})


def plan(opts: BuildOptions) -> DatasetPlan:
    size = DEFAULT_SIZE if opts.size is None else int(opts.size)
    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise ShardError(f"--size {size}: cluttered_digits renders {SIZE_RANGE[0]}..{SIZE_RANGE[1]} px images")
    count = DEFAULT_COUNT if opts.count is None else int(opts.count)
    if count < 1:
        raise ShardError(f"--count {count}: must be positive")
    k = _knobs(opts)
    if 8 * k["scale"][1] * 1.2 > size:
        raise ShardError(f"--size {size}: too small for --opt scale max {k['scale'][1]} (needs >= {8 * k['scale'][1] * 1.2:.0f})")
    seed = int(opts.seed)
    images, targets = _digits()
    n_src = len(images)
    ink_sum = images.reshape(n_src, -1).sum(1)
    ink = (ink_sum - ink_sum.min()) / (ink_sum.max() - ink_sum.min())
    colour_mode = k["mode"] == "colour"
    colour_of = np.random.default_rng([seed, 32]).integers(0, len(COLOURS), n_src) if colour_mode else None

    def seen(i: int) -> bool:
        if colour_mode:
            return seen_colour(int(targets[i]), int(colour_of[i]), seed)
        return int(targets[i]) in SEEN_CLASSES

    seen_idx = np.array([i for i in range(n_src) if seen(i)])
    perm = np.random.default_rng([seed, 33]).permutation(len(seen_idx))
    val_src = set(int(i) for i in seen_idx[perm[:int(round(k["val_fraction"] * len(seen_idx)))]])
    order = np.random.default_rng([seed, 34]).permutation(n_src)
    cfg = {"clutter": k["clutter"], "fragment": k["fragment"], "jpeg": k["jpeg"], "mode": k["mode"],
           "noise": k["noise"], "rotation": k["rotation"], "scale": k["scale"], "size": size}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    for n in range(count):
        idx, rep = int(order[n % n_src]), n // n_src
        split = ("val" if idx in val_src else "train") if seen(idx) else "test"
        digit = int(targets[idx])
        colour = int(colour_of[idx]) if colour_mode else -1
        splits[split].append({
            "category": digit * len(COLOURS) + colour if colour_mode else digit,
            "cfg": dict(cfg), "colour": colour, "idx": idx, "ink": round(float(ink[idx]), 4),
            "key": f"cd{idx:04d}-{rep:02d}", "rep": rep, "seed": seed, "split": split,
        })
    for s in splits:
        splits[s].sort(key=lambda d: d["key"])
    if colour_mode:
        categories = tuple(f"{d}-{c}" for d in range(10) for c, _ in COLOURS)
        seen_classes = [d * len(COLOURS) + c for d in range(10) for c in range(len(COLOURS)) if seen_colour(d, c, seed)]
    else:
        categories = tuple(str(d) for d in range(10))
        seen_classes = list(SEEN_CLASSES)
    meta = DatasetMeta(
        name=NAME,
        attributes=(AttributeSpec("ink", "continuous", localised=True,
                                  description="ink amount of the source digit (min-max normalised); box = the digit"),),
        categories=categories, splits=("train", "val", "test"),
        description="scikit-learn 8x8 digits scaled onto cluttered canvases; zero-shot class split",
        source="sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test part)",
        extra={
            "generator_version": GENERATOR_VERSION, "size": size, "count": count,
            "options": {key: k[key] for key in sorted(k)},
            "seen_categories": seen_classes,
            "unseen_categories": [c for c in range(len(categories)) if c not in seen_classes],
            "split_counts": {s: len(v) for s, v in splits.items()},
            "split_protocol": ("train/val: the seen categories (classes 0-4; in colour mode half of the digit x colour "
                               "classes), val = a val_fraction of the seen *source digits*; test: the unseen "
                               "categories. Zero-shot retrieval: query = gallery = test, Recall@K excluding the query "
                               "itself. instance = source digit index (renders of one source digit share it)."),
        },
    )
    fp = fingerprint_of(NAME, GENERATOR_VERSION, seed, size, count, {key: k[key] for key in sorted(k)})
    return DatasetPlan(meta=meta, splits=splits, load=load, pairs=[], fingerprint=fp)
