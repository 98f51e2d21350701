"""Decoding and augmentation of shard samples, run inside the loader workers.

Images leave the loader as uint8 CHW tensors (4x less to move than float; normalise on the
device). The pipeline follows the papers' recipe (resize to a fixed square, then a random crop
and a horizontal flip for training, the centre crop for evaluation: e.g. 227 from 256), and
attribute boxes are transformed with the image so localisation targets stay correct.
Decoding is torchvision's (libjpeg-turbo / libpng in C): PIL's Python-level header parsing
cost more than the decode itself on 64 px images.
"""
from __future__ import annotations

import io
import json
import random
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shards.format import DatasetMeta

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they remain the fastest
# decoder here. Filter that one message; fall back to PIL once torchvision drops them.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
try:
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - future torchvision without image codecs
    decode_image = None

IMAGE_EXTS = ("jpg", "png")


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> uint8 CHW RGB tensor, as the shard reader decodes every image."""
    if decode_image is not None:  # bytearray: frombuffer wants a writable buffer (3 KB copy)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


@dataclass(frozen=True)
class AugmentConfig:
    resize: int = 64  # every image is first resized to resize x resize (skipped when it already is)
    size: int = 56  # output side: a random crop (train) or the centre crop (eval) of the resized image
    hflip: bool = True  # train: flip horizontally with probability 1/2

    def __post_init__(self) -> None:
        if not 0 < self.size <= self.resize:
            raise ValueError(f"augment.size ({self.size}) must be in 1..augment.resize ({self.resize})")


def stable_id(value: str | None) -> int:
    """A process-independent 63-bit id for an instance string (-1 for none); hash() is salted."""
    if value is None:
        return -1
    return (zlib.crc32(value.encode()) | (zlib.adler32(value.encode()) << 32)) & 0x7FFFFFFFFFFFFFFF


class SampleDecoder:
    """bytes + label json -> tensors, with train-time augmentation from a seeded RNG."""

    def __init__(self, meta: DatasetMeta, cfg: AugmentConfig, train: bool) -> None:
        self.meta, self.cfg, self.train = meta, cfg, train
        self.names = meta.attribute_names
        self.index = {n: i for i, n in enumerate(self.names)}
        self.rng = random.Random(0)

    def seed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def image(self, data: bytes) -> tuple[torch.Tensor, tuple[float, float, float, float], bool]:
        """(uint8 CHW image, crop box in normalised coordinates, flipped?)."""
        x = decode_rgb(data)
        r, s = self.cfg.resize, self.cfg.size
        if x.shape[1:] != (r, r):
            x = F.interpolate(x[None], size=(r, r), mode="bilinear", antialias=True, align_corners=False)[0]
        if self.train:
            x0, y0 = self.rng.randint(0, r - s), self.rng.randint(0, r - s)
            flip = self.cfg.hflip and self.rng.random() < 0.5
        else:
            x0 = y0 = (r - s) // 2
            flip = False
        if s != r:
            x = x[:, y0:y0 + s, x0:x0 + s]
        if flip:
            x = x.flip(-1)
        return x.contiguous(), (x0 / r, y0 / r, (x0 + s) / r, (y0 + s) / r), flip

    # boxes and attributes in plain Python: a sample has a handful of values, and numpy's per-call
    # overhead on such tiny arrays was ~20% of the whole read + decode + augment time (py-spy)
    def boxes(self, label: dict[str, Any], crop: tuple[float, float, float, float], flip: bool) -> torch.Tensor:
        nan = float("nan")
        out = [[nan] * 4 for _ in self.names]
        given = label.get("boxes") or {}
        if given:
            x0, y0, x1, y1 = crop
            sx, sy = x1 - x0, y1 - y0
            for name, (a, b, c, d) in given.items():
                row = self.index[name]  # KeyError = a box for an undeclared attribute
                l, t, r, btm = (a - x0) / sx, (b - y0) / sy, (c - x0) / sx, (d - y0) / sy
                if flip:
                    l, r = 1 - r, 1 - l
                out[row] = [min(max(v, 0.0), 1.0) for v in (l, t, r, btm)]
        return torch.from_numpy(np.array(out, dtype=np.float32).reshape(len(self.names), 4))

    def attributes(self, label: dict[str, Any]) -> torch.Tensor:
        out = [float("nan")] * len(self.names)
        for name, v in (label.get("attributes") or {}).items():
            if v is not None:
                out[self.index[name]] = v
        return torch.from_numpy(np.array(out, dtype=np.float32))

    def one(self, data: bytes, label: dict[str, Any]) -> dict[str, Any]:
        img, crop, flip = self.image(data)
        return {"image": img, "attributes": self.attributes(label), "boxes": self.boxes(label, crop, flip)}

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
