"""External latents for latent_retrieval: precomputed StyleGAN W+ codes (e.g. e4e / pSp's
18 x 512 codes of CelebA, papers/latent_retrieval.txt Sec. 4) with a CelebA-style attribute file.
No network is needed: the codes are read from disk and fitted and evaluated with the same
Algorithm 2 and retrieval protocol as the trained latent space (models/latent_eval.py).

    latents    .npy (an [N, ...] array, rows in the order of --keys or of the attribute file)
               or .pt / .pth (a tensor, same order, or a {image name: tensor} dict), read with
               np.load(allow_pickle=False) / torch.load(weights_only=True)
    attributes list_attr_celeba.txt format: count line, names line, 'image v1 .. vK' (-1/1)
    partition  optional list_eval_partition.txt: 'image 0|1|2' (train / val / test); without
               it a seeded 80 / 10 / 10 split by image
    identities optional identity_CelebA.txt: 'image id' (adds same_identity@k)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.latent_eval import Split
from shards.format import ShardError
from shards.importers.celeba import SPLIT_CODES, read_attr_list, read_columns


@dataclass
class LatentTable:
    keys: list[str]
    W: torch.Tensor  # [N, D] float32 (W+ codes flattened)
    Y: torch.Tensor  # [N, M] 0/1
    names: tuple[str, ...]
    split: np.ndarray  # [N] 'train' | 'val' | 'test'
    identity: list[str]

    def subset(self, name: str) -> Split:
        rows = np.flatnonzero(self.split == name)
        if len(rows) == 0:
            raise ShardError(f"external latents: the {name!r} split is empty; check the partition file")
        idx = torch.from_numpy(rows)
        return Split(self.W[idx], self.Y[idx], self.Y[idx], [self.identity[i] for i in rows])


def _read_latents(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    if not path.is_file():
        raise ShardError(f"--latents {path}: not found")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ShardError(f"--latents {path}: not a plain numeric .npy array ({e})") from None
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — a pickle with code in it, or not a torch file at all
            raise ShardError(f"--latents {path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); save a tensor or a {{name: tensor}} dict") from None
        if isinstance(obj, torch.Tensor):
            return obj.float().numpy()
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v.float().numpy() for k, v in obj.items()}
        raise ShardError(f"--latents {path}: expected a tensor or a {{image name: tensor}} dict")
    raise ShardError(f"--latents {path}: unsupported suffix {path.suffix!r}; use .npy, .pt or .pth")


def load_external(latents: Path, attributes: Path, partition: Path | None = None, keys: Path | None = None,
                  identities: Path | None = None, use: tuple[str, ...] = (), seed: int = 0) -> LatentTable:
    names, rows = read_attr_list(Path(attributes))
    raw = _read_latents(Path(latents))
    if isinstance(raw, dict):
        order = [k for k in rows if k in raw]  # rows without a latent (or latents without a row) are left out
        if not order:
            raise ShardError(f"--latents {latents}: no image name matches {attributes}")
        W = np.stack([raw[k].reshape(-1) for k in order])
    else:
        order = [ln.strip() for ln in Path(keys).read_text().splitlines() if ln.strip()] if keys else list(rows)
        if len(order) != len(raw):
            src = f"--keys {keys}" if keys else f"--attributes {attributes}"
            raise ShardError(f"--latents {latents}: {len(raw)} rows but {src} lists {len(order)} images; "
                             "pass --keys with the image name of every row")
        missing = sum(k not in rows for k in order)
        if missing:
            raise ShardError(f"--attributes {attributes}: {missing} of the latents' images are not listed "
                             f"(e.g. {next(k for k in order if k not in rows)!r})")
        W = raw.reshape(len(raw), -1)
    if not np.isfinite(W).all():
        raise ShardError(f"--latents {latents}: contains NaN or inf")
    for n in use:
        if n not in names:
            raise ShardError(f"--use {n!r}: not an attribute of {attributes}; choose from {list(names)}")
    cols = [names.index(n) for n in use] if use else list(range(len(names)))
    Y = np.array([[rows[k][c] for c in cols] for k in order], dtype=np.float32)
    if partition is not None:
        part = read_columns(Path(partition), 2)
        split = np.array([SPLIT_CODES.get(part.get(k, ["?"])[0], "?") for k in order])
        if (split == "?").any():
            bad = order[int(np.flatnonzero(split == "?")[0])]
            raise ShardError(f"--partition {partition}: no 0/1/2 entry for image {bad!r}")
    else:
        u = np.random.default_rng(seed).random(len(order))
        split = np.where(u < 0.8, "train", np.where(u < 0.9, "val", "test"))
    ident = read_columns(Path(identities), 2) if identities is not None else {}
    identity = [ident.get(k, [k])[0] for k in order]  # no identity file: each image its own identity
    return LatentTable(order, torch.from_numpy(np.ascontiguousarray(W, dtype=np.float32)), torch.from_numpy(Y),
                       tuple(names[c] for c in cols), split, identity)
