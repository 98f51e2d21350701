"""A tiny synthetic dataset plan for writer/reader tests: coloured squares with known labels."""
from __future__ import annotations

from typing import Any

import numpy as np

from shards.format import AttributeSpec, DatasetMeta, Pair, Sample
from shards.plan import DatasetPlan, encode_image, fingerprint_of

META = DatasetMeta(
    name="toy",
    attributes=(AttributeSpec("bright", "continuous", localised=True), AttributeSpec("red", "binary")),
    categories=("a", "b", "c"),
    splits=("train", "test"),
)


def load(spec: dict[str, Any]) -> Sample:
    rng = np.random.default_rng(spec["seed"])
    size = spec.get("size", 16)
    img = (rng.random((size, size, 3)) * 60).astype(np.uint8)
    b = spec["bright"]
    img[4:12, 4:12] = min(255, int(80 + 170 * b))
    if spec["red"]:
        img[..., 0] = 255
    ext = spec.get("ext", "png")
    return Sample(key=spec["key"], image=encode_image(img, ext), ext=ext, split=spec["split"],
                  instance=f"id{spec['idx'] % 5}", category=spec["idx"] % 3,
                  attributes={"bright": b, "red": spec["red"]}, boxes={"bright": (0.25, 0.25, 0.75, 0.75)})


def specs(split: str, n: int, seed: int = 0, offset: int = 0, **extra: Any) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed + offset)
    return [{"key": f"{split}_{i:05d}", "split": split, "idx": i, "seed": seed * 100000 + offset + i,
             "bright": round(float(rng.random()), 4), "red": int(rng.random() < 0.5), **extra} for i in range(n)]


def plan(n_train: int = 24, n_test: int = 10, seed: int = 0, pairs: bool = True, **extra: Any) -> DatasetPlan:
    train, test = specs("train", n_train, seed, **extra), specs("test", n_test, seed, offset=50000, **extra)
    prs = None
    if pairs:
        prs = []
        for sp in (train, test):
            for a, b in zip(sp[:-1], sp[1:]):
                d = a["bright"] - b["bright"]
                prs.append(Pair(a["key"], b["key"], "bright", "more" if d > 0.05 else "less" if d < -0.05 else "similar", a["split"]))
    return DatasetPlan(meta=META, splits={"train": train, "test": test}, load=load, pairs=prs,
                       fingerprint=fingerprint_of("toy", seed, n_train, n_test, pairs, extra))
