"""`attrlab demo`: the main job on the embedded default (grows with each method that lands).

Now: build the attrworld and cluttered_digits shards, validate them, print where they are.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the main job end to end on the embedded datasets")
    p.add_argument("--out", type=Path, default=Path("data"))
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_demo)


def cmd_demo(a: argparse.Namespace) -> int:
    from shards.cli import summary
    from shards.datasets import BuildOptions, plan_embedded
    from shards.validate import validate
    from shards.writer import write_dataset

    failed = 0
    for name in ("attrworld", "cluttered_digits"):
        out = a.out / "shards" / name
        t0 = time.perf_counter()
        write_dataset(plan_embedded(name, BuildOptions()), out, shard_size=500, workers=a.workers)
        built = time.perf_counter() - t0
        problems, _ = validate(out)
        print(summary(out))
        print(f"  built in {built:.1f} s; validate: {'OK' if not problems else f'{len(problems)} problems'}")
        for p in problems[:10]:
            print(f"  BAD {p}")
        failed += bool(problems)
    print(f"\nshards are under {(a.out / 'shards').resolve()}; re-running resumes and skips verified shards")
    return 1 if failed else 0
