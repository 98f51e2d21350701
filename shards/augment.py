"""Decoding and augmentation of shard samples, run inside the loader workers.

Images leave the loader as uint8 CHW tensors (4x less to move than float; normalise on the
device). Augmentation is a random square crop + horizontal flip + resize, and attribute boxes
are transformed with the image so localisation targets stay correct. PIL does the pixel work:
on 64 px images its C routines beat building torch tensors per op.
"""
from __future__ import annotations

import io
import json
import random
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from shards.format import DatasetMeta

IMAGE_EXTS = ("jpg", "png")


@dataclass(frozen=True)
class AugmentConfig:
    size: int = 64  # output side in px (every image is resized to size x size)
    crop_min: float = 0.85  # train: random square crop with side in [crop_min, 1] x the short side
    hflip: bool = True  # train: flip horizontally with probability 1/2


def stable_id(value: str | None) -> int:
    """A process-independent 63-bit id for an instance string (-1 for none); hash() is salted."""
    if value is None:
        return -1
    return zlib.crc32(value.encode()) | (zlib.adler32(value.encode()) << 32) & 0x7FFFFFFFFFFFFFFF


class SampleDecoder:
    """bytes + label json -> tensors, with train-time augmentation from a seeded RNG."""

    def __init__(self, meta: DatasetMeta, cfg: AugmentConfig, train: bool) -> None:
        self.meta, self.cfg, self.train = meta, cfg, train
        self.names = meta.attribute_names
        self.index = {n: i for i, n in enumerate(self.names)}
        self.rng = random.Random(0)

    def seed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def _geometry(self, w: int, h: int) -> tuple[tuple[int, int, int, int], bool]:
        if not self.train or self.cfg.crop_min >= 1.0:
            return (0, 0, w, h), False
        side = max(1, round(min(w, h) * self.rng.uniform(self.cfg.crop_min, 1.0)))
        x0, y0 = self.rng.randint(0, w - side), self.rng.randint(0, h - side)
        return (x0, y0, x0 + side, y0 + side), self.cfg.hflip and self.rng.random() < 0.5

    def image(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int, int, int], bool, tuple[int, int]]:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (self.cfg.size, self.cfg.size))  # JPEG: decode at reduced scale when large
        img = img.convert("RGB")
        w, h = img.size
        box, flip = self._geometry(w, h)
        s = self.cfg.size
        if box != (0, 0, w, h):
            img = img.crop(box)
        if img.size != (s, s):
            img = img.resize((s, s), Image.BILINEAR)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), box, flip, (w, h)

    def boxes(self, label: dict[str, Any], crop: tuple[int, int, int, int], flip: bool, wh: tuple[int, int]) -> torch.Tensor:
        out = torch.full((len(self.names), 4), float("nan"))
        w, h = wh
        cx0, cy0, cx1, cy1 = crop[0] / w, crop[1] / h, crop[2] / w, crop[3] / h
        for name, b in (label.get("boxes") or {}).items():
            i = self.index.get(name)
            if i is None:
                raise ValueError(f"box for unknown attribute {name!r}")
            x0, y0, x1, y1 = ((b[0] - cx0) / (cx1 - cx0), (b[1] - cy0) / (cy1 - cy0),
                              (b[2] - cx0) / (cx1 - cx0), (b[3] - cy0) / (cy1 - cy0))
            if flip:
                x0, x1 = 1 - x1, 1 - x0
            out[i] = torch.tensor([x0, y0, x1, y1]).clamp(0, 1)
        return out

    def attributes(self, label: dict[str, Any]) -> torch.Tensor:
        out = torch.full((len(self.names),), float("nan"))
        for name, v in (label.get("attributes") or {}).items():
            if v is not None:
                out[self.index[name]] = float(v)
        return out

    def one(self, data: bytes, label: dict[str, Any]) -> dict[str, Any]:
        img, crop, flip, wh = self.image(data)
        return {"image": img, "attributes": self.attributes(label), "boxes": self.boxes(label, crop, flip, wh)}

    def decode(self, files: dict[str, bytes], kind: str) -> dict[str, Any]:
        label = json.loads(files["json"])
        if kind == "samples":
            data = next((files[e] for e in IMAGE_EXTS if e in files), None)
            if data is None:
                raise ValueError(f"no image member (have {sorted(files)})")
            out = self.one(data, label)
            cat = label.get("category")
            out["category"] = -1 if cat is None else int(cat)
            out["instance"] = label.get("instance") or ""
            out["instance_id"] = stable_id(label.get("instance"))
            return out
        sides = {}
        for side in ("a", "b"):
            data = next((files[f"{side}.{e}"] for e in IMAGE_EXTS if f"{side}.{e}" in files), None)
            if data is None:
                raise ValueError(f"pair has no image {side}.jpg|png")
            sides[side] = self.one(data, label[f"label_{side}"])
        out = {f"{k}_{side}": v for side, d in sides.items() for k, v in d.items()}
        out["key_a"], out["key_b"] = label["key_a"], label["key_b"]
        out["attribute"] = self.index[label["attribute"]]
        out["label"] = torch.tensor(float(label["label"]))
        return out
