"""`attrlab shards build|import|validate|info`."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from shards.format import ShardError, read_manifest, read_meta


def _kv(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ShardError(f"{flag} {item!r}: expected KEY=VALUE")
        out[k] = v
    return out


def _workers(n: int | None) -> int:
    if n is not None and n < 1:
        raise ShardError(f"--workers {n}: must be >= 1 (or leave it out: the cores, at most 4)")
    return n if n else max(1, min(4, os.cpu_count() or 1))


def add_parser(sub: Any) -> None:
    p = sub.add_parser("shards", help="build, import, validate and inspect WebDataset shards")
    s = p.add_subparsers(dest="shards_cmd", required=True)

    b = s.add_parser("build", help="generate an embedded dataset (no download)")
    b.add_argument("name", help="attrworld | cluttered_digits | lfw_subset")
    b.add_argument("--out", required=True, type=Path)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", type=int, default=None, help="image side in px")
    b.add_argument("--count", type=int, default=None, help="number of images")
    b.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="dataset-specific knob")
    _write_args(b)
    b.set_defaults(func=cmd_build)

    i = s.add_parser("import", help="convert a local copy of a published dataset")
    i.add_argument("name")
    i.add_argument("--src", required=True, type=Path)
    i.add_argument("--out", required=True, type=Path)
    i.add_argument("--resize", type=int, default=None, help="longest side in px (default: keep originals)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--val-fraction", type=float, default=0.1)
    i.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="importer-specific option")
    _write_args(i)
    i.set_defaults(func=cmd_import)

    v = s.add_parser("validate", help="check manifest, checksums, images, labels and pairs")
    v.add_argument("dir", type=Path)
    v.set_defaults(func=cmd_validate)

    n = s.add_parser("info", help="print a shard directory's summary")
    n.add_argument("dir", type=Path)
    n.set_defaults(func=cmd_info)


def _write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: cores, max 4)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a shard set of another dataset, options, count or seed already in --out")


def summary(root: Path) -> str:
    meta, man = read_meta(root), read_manifest(root)
    lines = [f"{meta.name} at {Path(root).resolve()}  (manifest checksum {man['checksum']})"]
    for split in meta.splits:
        e = man["splits"].get(split, {"count": 0, "shards": []})
        pe = man.get("pair_splits", {}).get(split)
        pairs = f", {pe['count']} pairs in {len(pe['shards'])} shards" if pe else ""
        lines.append(f"  {split:<8} {e['count']:>7} images in {len(e['shards'])} shards{pairs}")
    kinds = ", ".join(f"{a.name}({a.kind[:4]}{'*' if a.localised else ''})" for a in meta.attributes)
    lines.append(f"  attributes: {kinds or '-'}   (* = localised, with boxes)")
    lines.append(f"  categories: {len(meta.categories)}")
    return "\n".join(lines)


def cmd_build(a: argparse.Namespace) -> int:
    from shards.datasets import BuildOptions, plan_embedded
    from shards.writer import write_dataset

    plan = plan_embedded(a.name, BuildOptions(seed=a.seed, size=a.size, count=a.count, options=_kv(a.opt, "--opt")))
    write_dataset(plan, a.out, shard_size=a.shard_size, workers=_workers(a.workers), progress=not a.no_progress,
                  overwrite=a.overwrite)
    print(summary(a.out))
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from shards.importers import IMPORTERS, ImportOptions, plan_import
    from shards.writer import write_dataset

    if a.name not in IMPORTERS:
        raise ShardError(f"unknown dataset {a.name!r}; importers: {', '.join(sorted(IMPORTERS))}")
    if not 0 <= a.val_fraction < 1:
        raise ShardError(f"--val-fraction {a.val_fraction}: must be in [0, 1)")
    if a.resize is not None and a.resize < 1:
        raise ShardError(f"--resize {a.resize}: the longest side in px must be >= 1 (or leave it out to keep the originals)")
    opts = ImportOptions(resize=a.resize, seed=a.seed, val_fraction=a.val_fraction, options=_kv(a.opt, "--opt"))
    if a.out.resolve() == a.src.resolve() or a.src.resolve() in a.out.resolve().parents:
        raise ShardError(f"--out {a.out}: must not lie inside --src {a.src}; the source stays read-only")
    plan = plan_import(a.name, a.src, opts)
    write_dataset(plan, a.out, shard_size=a.shard_size, workers=_workers(a.workers), progress=not a.no_progress,
                  overwrite=a.overwrite, source=str(a.src.resolve()))
    print(summary(a.out))
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from shards.validate import validate

    problems, counts = validate(a.dir, progress=True)
    if problems:
        for p in problems[:100]:
            print(f"BAD {p}")
        if len(problems) > 100:
            print(f"... and {len(problems) - 100} more problems")
        print(f"{a.dir}: {len(problems)} problems")
        return 1
    order = read_meta(a.dir).splits
    print(f"{a.dir}: OK ({', '.join(f'{k} {counts[k]}' for k in order if k in counts)} samples)")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    print(summary(a.dir))
    meta = read_meta(a.dir)
    if meta.extra:
        print("  extra: " + json.dumps(meta.extra, sort_keys=True)[:2000])
    return 0
