"""Benchmark: reading + decoding + augmenting 64 px attrworld, shards vs individual files.

    python -m bench.shard_read --out data/bench [--count 6000] [--ray]

One process, one torch thread (a per-core figure). Every pipeline runs the same SampleDecoder
(decode, random 56 px crop of the 64 px image, flip); only the storage differs:
  shards      attrlab's ShardStream over the tar shards (train mode: shard cycling + shuffle buffer)
  wds         the webdataset library's own pipeline over the same shards, same decoder
  files       ImageFolder-style: one image file + one json file per sample
  ray_data    ray.data.read_webdataset + map_batches with the same decoder (with --ray)
Each is measured warm (page cache hot) and cold (files evicted with posix_fadvise DONTNEED, the
case of a dataset larger than RAM or on a network filesystem). Prints a table and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from shards.augment import AugmentConfig, SampleDecoder
from shards.format import read_meta
from shards.reader import LoaderConfig, ShardStream, iter_samples, shard_paths

AUG = AugmentConfig(resize=64, size=56, hflip=True)  # the papers' 227-of-256 recipe at 64 px


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ensure_data(out: Path, count: int) -> Path:
    from shards.datasets import BuildOptions, plan_embedded
    from shards.writer import write_dataset

    root = out / "attrworld"
    write_dataset(plan_embedded("attrworld", BuildOptions(count=count)), root, shard_size=500, workers=2, overwrite=True)
    files = out / "attrworld_files"
    if not (files / "DONE").exists():
        for r in iter_samples(root, "train"):
            d = files / str(r["label"]["category"])
            d.mkdir(parents=True, exist_ok=True)
            (ext, data), = r["files"].items()
            (d / f"{r['key']}.{ext}").write_bytes(data)
            (d / f"{r['key']}.json").write_text(json.dumps(r["label"]))
        (files / "DONE").write_text("")
    return root


def run_shards(root: Path, n: int) -> Iterator[dict]:
    ds = ShardStream(root, "train", mode="train", augment=AUG, rank=0, world_size=1,
                     cfg=LoaderConfig(batch_size=1, num_workers=0, shuffle_buffer=500, samples_per_epoch=n))
    yield from ds


def run_wds(root: Path, n: int) -> Iterator[dict]:
    import webdataset as wds

    dec = SampleDecoder(read_meta(root), AUG, train=True)
    urls = [str(p) for p in shard_paths(root, "train")[0]]
    pipe = wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(500)
    for i, s in enumerate(pipe):
        if i >= n:
            return
        yield dec.decode({k: v for k, v in s.items() if not k.startswith("__")}, "samples")


def file_list(root: Path) -> list[Path]:
    return sorted(p for p in (root.parent / "attrworld_files").rglob("*") if p.suffix in (".png", ".jpg"))


def run_files(root: Path, n: int) -> Iterator[dict]:
    import random

    dec = SampleDecoder(read_meta(root), AUG, train=True)
    paths = file_list(root)
    random.Random(0).shuffle(paths)  # a training loader visits files in random order
    for p in paths[:n]:
        files = {p.suffix[1:]: p.read_bytes(), "json": p.with_suffix(".json").read_bytes()}
        yield dec.decode(files, "samples")


def time_it(fn: Callable[[Path, int], Iterator[dict]], root: Path, n: int) -> float:
    t0 = time.perf_counter()
    k = sum(1 for _ in fn(root, n))
    return k / (time.perf_counter() - t0)


def ray_data_rate(root: Path, n: int) -> float:
    import numpy as np
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        dec = SampleDecoder(read_meta(root), AUG, train=True)
        urls = [str(p) for p in shard_paths(root, "train")[0]]

        def decode(batch: dict) -> dict:
            ext = "jpg" if "jpg" in batch else "png"
            imgs = [dec.decode({ext: p, "json": j}, "samples")["image"].numpy() for p, j in zip(batch[ext], batch["json"])]
            return {"image": np.stack(imgs)}

        ds = ray.data.read_webdataset(urls, decoder=None).limit(n).map_batches(decode, batch_size=256)
        t0 = time.perf_counter()
        k = sum(len(b["image"]) for b in ds.iter_batches(batch_size=256))
        return k / (time.perf_counter() - t0)
    finally:
        ray.shutdown()


PIPELINES: dict[str, Callable[[Path, int], Iterator[dict]]] = {"shards": run_shards, "wds": run_wds, "files": run_files}


def pipeline_files(root: Path, name: str) -> list[Path]:
    """The files a pipeline reads (evicted from the page cache for a cold measurement)."""
    if name == "files":
        return [q for p in file_list(root) for q in (p, p.with_suffix(".json"))]
    return shard_paths(root, "train")[0]


def measure(root: Path, n: int, repeats: int, pipelines: tuple[str, ...] = ("shards", "wds", "files"),
            caches: tuple[str, ...] = ("warm", "cold")) -> dict[tuple[str, str], float]:
    """(pipeline, cache) -> median samples/s of `repeats` interleaved runs of n samples each, in this
    process (set torch's threads first for a per-core figure). Warm runs are preceded by a short
    pass that fills the page cache; cold runs start with the pipeline's files evicted."""
    samples: dict[tuple[str, str], list[float]] = {}
    for cache in caches:
        for _ in range(repeats):  # interleaved repeats; the median is reported
            for name in pipelines:
                if cache == "cold":
                    evict(pipeline_files(root, name))
                else:
                    time_it(PIPELINES[name], root, min(n, 300))  # warm the page cache and the code paths
                samples.setdefault((name, cache), []).append(time_it(PIPELINES[name], root, n))
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/bench"))
    ap.add_argument("--count", type=int, default=6000)
    ap.add_argument("--n", type=int, default=3000, help="samples timed per pipeline and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray", action="store_true", help="also time ray.data.read_webdataset")
    a = ap.parse_args()
    torch.set_num_threads(1)
    root = ensure_data(a.out, a.count)
    rates = measure(root, a.n, a.repeats)
    rows = [(n, c, r) for (n, c), r in rates.items()]
    if a.ray:
        rows.append(("ray_data", "warm", ray_data_rate(root, a.n)))
    rate = {(n, c): r for n, c, r in rows}
    print(f"{'pipeline':<10} {'cache':<5} {'samples/s/core':>15}")
    for n, c, r in rows:
        print(f"{n:<10} {c:<5} {r:>15.0f}")
    for c in ("warm", "cold"):
        print(f"ratio shards/files ({c}): {rate[('shards', c)] / rate[('files', c)]:.2f}x   "
              f"shards/wds: {rate[('shards', c)] / rate[('wds', c)]:.2f}x")
    print(f"goal: >= 2000 samples/s/core -> {'met' if rate[('shards', 'warm')] >= 2000 else 'NOT met'} (warm); "
          f">= 3x files -> warm {'met' if rate[('shards', 'warm')] >= 3 * rate[('files', 'warm')] else 'NOT met'}, "
          f"cold {'met' if rate[('shards', 'cold')] >= 3 * rate[('files', 'cold')] else 'NOT met'}")


if __name__ == "__main__":
    main()
