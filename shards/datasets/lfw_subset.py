"""lfw_subset: scikit-image's 200 tiny real photos (100 LFW faces, 100 non-faces), a smoke set.

skimage.data.lfw_subset() ships in the scikit-image wheel (no download): 200 greyscale 25x25
crops, the first 100 faces and the last 100 non-face patches. They are upscaled (bicubic) to
--size (default 64) and stored as RGB PNG. Labels: binary attribute 'face', category
non_face / face, instance = the source index. Splits train/test are stratified by class and
deterministic in the seed (test_fraction, default 0.25 -> 75 / 25 per class).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

import numpy as np
from PIL import Image

from shards.datasets import BuildOptions
from shards.format import AttributeSpec, DatasetMeta, Sample, ShardError
from shards.plan import DatasetPlan, encode_image, fingerprint_of

NAME = "lfw_subset"
GENERATOR_VERSION = "lfw_subset/1"
DEFAULT_SIZE = 64
SIZE_RANGE = (16, 256)
N_FACES = 100
KNOBS: dict[str, tuple[Any, str]] = {
    "test_fraction": (0.25, "fraction of each class in 'test' (stratified, by seed)"),
}
KNOWN_OPTIONS = tuple(KNOBS)


@lru_cache(maxsize=1)
def _images() -> np.ndarray:
    from skimage.data import lfw_subset

    x = np.asarray(lfw_subset(), dtype=np.float64)
    x.setflags(write=False)
    return x


def load(spec: Mapping[str, Any]) -> Sample:
    idx, size = int(spec["idx"]), int(spec["size"])
    g = np.clip(np.rint(_images()[idx] * 255), 0, 255).astype(np.uint8)
    im = Image.fromarray(g, "L").resize((size, size), Image.BICUBIC).convert("RGB")
    face = int(idx < N_FACES)
    return Sample(key=spec["key"], image=encode_image(im, "png"), ext="png", split=spec["split"],
                  instance=str(idx), category=face, attributes={"face": face}, extra={"source_index": idx})


def plan(opts: BuildOptions) -> DatasetPlan:
    size = DEFAULT_SIZE if opts.size is None else int(opts.size)
    if not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise ShardError(f"--size {size}: lfw_subset upscales to {SIZE_RANGE[0]}..{SIZE_RANGE[1]} px")
    raw = opts.options.get("test_fraction", "0.25")
    try:
        frac = float(raw)
    except ValueError:
        raise ShardError(f"--opt test_fraction={raw}: expected a number") from None
    if not 0.0 < frac < 1.0:
        raise ShardError(f"--opt test_fraction={raw}: must be in (0, 1)")
    n = len(_images())
    if opts.count is not None and opts.count != n:
        raise ShardError(f"--count {opts.count}: lfw_subset always has {n} images; leave --count out")
    seed = int(opts.seed)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for cls, idxs in ((1, range(0, N_FACES)), (0, range(N_FACES, n))):
        idxs = list(idxs)
        perm = np.random.default_rng([seed, 41, cls]).permutation(len(idxs))
        n_test = int(round(frac * len(idxs)))
        for r, j in enumerate(perm):
            split = "test" if r < n_test else "train"
            idx = idxs[int(j)]
            splits[split].append({"idx": idx, "key": f"lfw{idx:03d}", "size": size, "split": split})
    for s in splits:
        splits[s].sort(key=lambda d: d["key"])
    meta = DatasetMeta(
        name=NAME, attributes=(AttributeSpec("face", "binary", description="the patch is a face"),),
        categories=("non_face", "face"), splits=("train", "test"),
        description="scikit-image lfw_subset: 100 face and 100 non-face 25x25 photos, upscaled",
        source="skimage.data.lfw_subset (Labeled Faces in the Wild crops; non-faces from the same photos)",
        extra={"generator_version": GENERATOR_VERSION, "size": size, "options": {"test_fraction": frac},
               "split_counts": {s: len(v) for s, v in splits.items()},
               "split_protocol": "stratified by class: test_fraction of the faces and of the non-faces in test"},
    )
    fp = fingerprint_of(NAME, GENERATOR_VERSION, seed, size, {"test_fraction": frac})
    return DatasetPlan(meta=meta, splits=splits, load=load, pairs=[], fingerprint=fp)
