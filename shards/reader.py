"""Shard reading for training and evaluation, in a Ray Train worker or a plain process.

Splitting is explicit: a stream knows its (rank, world_size) — from the arguments, else from
torch.distributed (Ray Train initialises it), else (0, 1) — and its DataLoader worker id.

* train: every (rank, loader worker) draws shards from a per-epoch permutation seeded by
  (seed, epoch), cycling (resampling) forever, shuffles samples in a buffer, and stops after a
  fixed number of *full* batches, identical on every rank: DDP never waits on a short rank.
* eval: shard i goes to rank i % world_size, then to loader worker (i // world_size) % workers,
  read once in order: every sample exactly once across all ranks and workers.

Decoding and augmentation run in the loader workers (shards.augment). A corrupt image or
label is logged with its shard and key, counted in the next sample's `skipped` field, and
skipped; a truncated tar is logged and the stream moves on. Batch shapes never change.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.augment import AugmentConfig, SampleDecoder
from shards.format import ShardError, read_manifest, read_meta
from shards.tario import TarCorrupt, iter_tar_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """How a split is streamed; part of every method's `data` config section."""

    batch_size: int = 32
    num_workers: int = 2
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None  # per epoch over all ranks; None = the split's size
    seed: int = 0
    classes_per_batch: int = 8  # class-balanced batching: P classes x m images
    images_per_class: int = 4
    class_field: str = "instance"  # 'instance' or 'category'

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(f"loader.batch_size must be >= 1 (got {self.batch_size}), loader.num_workers and "
                             "loader.shuffle_buffer >= 0")
        if self.classes_per_batch < 1 or self.images_per_class < 1:
            raise ValueError("loader.classes_per_batch and loader.images_per_class must be >= 1")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"loader.samples_per_epoch must be >= 1 or null, got {self.samples_per_epoch}")


def shard_paths(root: Path, split: str, kind: str = "samples") -> tuple[list[Path], int]:
    """The split's shard files (checked to exist) and its sample count, from the manifest."""
    entry = split_entry(read_manifest(root), root, split, kind)
    return [Path(root) / s["file"] for s in entry["shards"]], int(entry["count"])


def split_entry(manifest: dict[str, Any], root: Path, split: str, kind: str = "samples") -> dict[str, Any]:
    """The manifest's entry for a split ({count, shards: [{file, count, sha256}]}), its shards checked to exist."""
    root = Path(root)
    table = manifest["splits"] if kind == "samples" else manifest.get("pair_splits", {})
    if split not in table:
        have = sorted(k for k, v in table.items() if v["count"])
        what = "split" if kind == "samples" else "pair split"
        raise ShardError(f"{root}/manifest.json: no {what} {split!r}; available: {have}")
    entry = table[split]
    if not entry["count"]:
        raise ShardError(f"{root}/manifest.json: {kind} split {split!r} is empty; choose another split or rebuild with samples in it")
    for s in entry["shards"]:
        if not (root / s["file"]).is_file():
            raise ShardError(f"{root / s['file']}: shard listed in manifest.json is missing; restore it or re-run the "
                             "build to rewrite it")
    return entry


def verify_split(root: Path, split: str) -> dict[str, Any]:
    """The manifest, after checking the split's sample shards (and its pair shards, when there are
    any) against its sha256. Training skips corrupt samples with a warning and goes on; an evaluation or
    an index must not: it would score or index a silently smaller set."""
    from shards.tario import sha256_file

    root = Path(root)
    manifest = read_manifest(root)
    entries = [split_entry(manifest, root, split)]
    if split in manifest.get("pair_splits", {}):
        entries.append(split_entry(manifest, root, split, "pairs"))
    for entry in entries:
        for shard in entry["shards"]:
            path = root / shard["file"]
            if sha256_file(path) != shard["sha256"]:
                raise ShardError(f"{path}: sha256 differs from manifest.json (corrupt or modified), so split {split!r} "
                                 f"would be scored on part of its samples; restore the file or rebuild the shards "
                                 f"(`attrlab shards validate {root}` lists every problem)")
    return manifest


def iter_samples(root: Path, split: str, kind: str = "samples") -> Iterator[dict[str, Any]]:
    """Plain sequential read of one split (tools, validation): {'key', 'files', 'label'}."""
    paths, _ = shard_paths(root, split, kind)
    for p in paths:
        for key, files in iter_tar_groups(p):
            label = json.loads(files.pop("json")) if "json" in files else None
            yield {"key": key, "shard": p.name, "files": files, "label": label}


def iter_label_records(root: Path, split: str) -> Iterator[dict[str, Any]]:
    """Every sample's label json of a split, read through index/<split>.tsv offsets (no image
    bytes are read); falls back to a full sequential read when the index is absent."""
    root = Path(root)
    index = root / "index" / f"{split}.tsv"
    if not index.is_file():
        for s in iter_samples(root, split):
            if s["label"] is not None:
                yield s["label"]
        return
    shard_paths(root, split)  # the manifest's checks: split exists, shards present
    handles: dict[str, Any] = {}
    try:
        with open(index, encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split("\t")
            col = {name: i for i, name in enumerate(header)}
            for line in f:
                row = line.rstrip("\n").split("\t")
                shard = row[col["shard"]]
                if shard not in handles:
                    handles[shard] = open(root / shard, "rb")
                fh = handles[shard]
                fh.seek(int(row[col["json_offset"]]))
                yield json.loads(fh.read(int(row[col["json_size"]])))
    finally:
        for fh in handles.values():
            fh.close()


def _pair_attribute(files: dict[str, bytes]) -> str | None:
    try:
        return json.loads(files["json"]).get("attribute")
    except (KeyError, ValueError):
        return None  # corrupt: let the decoder report it


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """An IterableDataset over one split's shards; see the module docstring for the contract.

    kind: 'samples' (one image each) or 'pairs' (relative-attribute pairs); batching: 'none'
    (the DataLoader batches) or 'class_balanced' (yields ready P x m batches).
    """

    def __init__(self, root: Path, split: str, *, mode: str, cfg: LoaderConfig, augment: AugmentConfig,
                 kind: str = "samples", batching: str = "none", rank: int | None = None,
                 world_size: int | None = None, pair_attributes: tuple[str, ...] = ()) -> None:
        if mode not in ("train", "eval"):
            raise ShardError(f"mode {mode!r}: expected 'train' or 'eval'")
        if batching not in ("none", "class_balanced") or (batching == "class_balanced" and kind != "samples"):
            raise ShardError(f"batching {batching!r}: expected 'none', or 'class_balanced' for image samples")
        if cfg.class_field not in ("instance", "category"):
            raise ShardError(f"data.class_field {cfg.class_field!r}: expected 'instance' or 'category'")
        self.root, self.split, self.mode, self.kind, self.batching = Path(root), split, mode, kind, batching
        self.cfg = cfg
        entry = split_entry(read_manifest(self.root), self.root, split, kind)
        self.paths, self.count = [self.root / s["file"] for s in entry["shards"]], int(entry["count"])
        self.shard_counts = {s["file"]: int(s["count"]) for s in entry["shards"]}  # to count what a truncation loses
        self.decoder = SampleDecoder(read_meta(self.root), augment, train=(mode == "train"))
        r, w = dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ShardError(f"rank {self.rank} is outside world size {self.world_size}")
        self.epoch = 0
        # pairs: keep only comparisons of these attributes (() = all), checked before decoding
        self.pair_attributes = frozenset(pair_attributes)
        unknown = self.pair_attributes - set(self.decoder.names)
        if unknown:
            raise ShardError(f"pair attributes {sorted(unknown)} are not in {self.root}/meta.json")

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch (workers are re-created and read it)."""
        self.epoch = epoch

    # -- sizing ---------------------------------------------------------------------------
    def batch_size(self) -> int:
        c = self.cfg
        return c.classes_per_batch * c.images_per_class if self.batching == "class_balanced" else c.batch_size

    def batches_per_epoch(self) -> int:
        """Full batches per rank per epoch (train), the same on every rank."""
        total = self.cfg.samples_per_epoch or self.count
        return max(1, total // (self.world_size * self.batch_size()))

    def _worker_batches(self, wid: int, nw: int) -> int:
        b = self.batches_per_epoch()
        return b // nw + (1 if wid < b % nw else 0)

    # -- shard assignment ---------------------------------------------------------------
    def eval_shards(self, wid: int, nw: int) -> list[Path]:
        return [p for i, p in enumerate(self.paths)
                if i % self.world_size == self.rank and (i // self.world_size) % nw == wid]

    def _train_shard_cycle(self, rng: random.Random, wid: int, nw: int) -> Iterator[Path]:
        n = len(self.paths)
        perm = random.Random(f"{self.cfg.seed}/{self.epoch}/perm").sample(range(n), n)
        mine = perm[self.rank::self.world_size][wid::nw]
        if not mine:  # fewer shards than rank x worker slots: share shards, shuffled differently
            mine = [perm[(self.rank * nw + wid) % n]]
        while True:
            rng.shuffle(mine)
            for i in mine:
                yield self.paths[i]

    # -- iteration ------------------------------------------------------------------------
    def _raw(self, shards: Iterator[Path] | list[Path], stats: dict[str, int]) -> Iterator[tuple[str, str, dict]]:
        for path in shards:
            read = 0
            try:
                for key, files in iter_tar_groups(path):
                    read += 1
                    yield path.name, key, files
            except TarCorrupt as e:
                lost = max(1, self.shard_counts.get(path.name, 0) - read)  # every sample the manifest lists after it
                stats["skipped"] += lost
                log.warning("corrupt shard %s after key %r: %s; skipping the rest of it (%d samples)", path,
                            e.last_key, e.cause, lost)

    def _decode(self, shard: str, key: str, files: dict, stats: dict[str, int]) -> dict[str, Any] | None:
        if (self.mode == "eval" and self.pair_attributes and self.kind == "pairs"  # train filters before buffering
                and _pair_attribute(files) not in self.pair_attributes):
            return None  # filtered, not corrupt: not counted in `skipped`
        try:
            out = self.decoder.decode(files, self.kind)
        except Exception as e:  # noqa: BLE001 — any decode failure of one sample is skipped, never fatal
            stats["skipped"] += 1
            log.warning("skipping corrupt sample %s in %s: %s", key, shard, e)
            return None
        out["key"] = key
        out["skipped"] = stats["skipped"]
        stats["skipped"] = 0
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        stats = {"skipped": 0}
        if self.mode == "eval":
            for shard, key, files in self._raw(self.eval_shards(wid, nw), stats):
                if (s := self._decode(shard, key, files, stats)) is not None:
                    yield s
            return
        rng = random.Random(f"{self.cfg.seed}/{self.epoch}/{self.rank}/{wid}")
        self.decoder.seed(rng.getrandbits(32))
        raw = self._raw(self._train_shard_cycle(rng, wid, nw), stats)
        n_batches = self._worker_batches(wid, nw)
        if self.batching == "class_balanced":
            yield from self._class_balanced(raw, rng, n_batches, stats)
            return
        n, buf, cap = n_batches * self.cfg.batch_size, [], max(1, self.cfg.shuffle_buffer)
        misses = 0
        while n > 0:
            item = next(raw)
            if self.pair_attributes and self.kind == "pairs" and _pair_attribute(item[2]) not in self.pair_attributes:
                misses += 1
                if misses > 2 * self.count:  # two passes without one wanted pair: it would spin forever
                    raise ShardError(f"{self.root}: split {self.split!r} has no pairs of {sorted(self.pair_attributes)}")
                continue
            misses = 0
            if len(buf) < cap:
                buf.append(item)
                continue
            j = rng.randrange(cap)
            item, buf[j] = buf[j], item
            if (s := self._decode(*item, stats)) is not None:
                n -= 1
                yield s

    def _class_balanced(self, raw: Iterator[tuple[str, str, dict]], rng: random.Random, n_batches: int,
                        stats: dict[str, int]) -> Iterator[dict[str, Any]]:
        P, m, cap = self.cfg.classes_per_batch, self.cfg.images_per_class, max(self.cfg.shuffle_buffer, 1)
        buckets: dict[Any, list[tuple[str, str, dict]]] = {}
        size = 0
        field = self.cfg.class_field
        for _ in range(n_batches):
            batch: list[dict[str, Any]] = []
            while len(batch) < P * m:
                ready = [c for c, v in buckets.items() if len(v) >= m]
                if size < cap or len(ready) < P:
                    if size >= 10 * cap:
                        raise ShardError(
                            f"class-balanced batches need {P} classes with {m} images each, but a buffer of {size} "
                            f"samples from {self.split!r} holds only {len(ready)}; raise data.shuffle_buffer or "
                            "lower data.classes_per_batch / data.images_per_class")
                    item = next(raw)
                    try:
                        cls = json.loads(item[2]["json"])[field]
                    except Exception as e:  # noqa: BLE001 — a broken label is a corrupt sample
                        stats["skipped"] += 1
                        log.warning("skipping corrupt label %s in %s: %s", item[1], item[0], e)
                        continue
                    if cls is None:
                        continue
                    buckets.setdefault(cls, []).append(item)
                    size += 1
                    continue
                batch = []
                for c in rng.sample(sorted(ready, key=str), P):
                    got = 0
                    while got < m and buckets[c]:
                        item = buckets[c].pop(rng.randrange(len(buckets[c])))
                        size -= 1
                        if (s := self._decode(*item, stats)) is not None:
                            batch.append(s)
                            got += 1
                    if not buckets[c]:
                        del buckets[c]
                    if got < m:  # corrupt samples emptied this class: drop the partial batch, refill
                        batch = []
                        break
            yield torch.utils.data.default_collate(batch)


def make_loader(root: Path, split: str, *, mode: str, cfg: LoaderConfig, augment: AugmentConfig,
                kind: str = "samples", batching: str = "none", rank: int | None = None,
                world_size: int | None = None, pair_attributes: tuple[str, ...] = ()) -> DataLoader:
    """A DataLoader over a ShardStream; in train mode every batch is full."""
    ds = ShardStream(root, split, mode=mode, cfg=cfg, augment=augment, kind=kind, batching=batching,
                     rank=rank, world_size=world_size, pair_attributes=pair_attributes)
    balanced = batching == "class_balanced"
    return DataLoader(ds, batch_size=None if balanced else cfg.batch_size, num_workers=cfg.num_workers,
                      drop_last=False, persistent_workers=False,
                      multiprocessing_context="fork" if cfg.num_workers > 0 else None)
