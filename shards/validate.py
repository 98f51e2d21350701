"""`attrlab shards validate DIR`: manifest, checksums, decodability, label schema, pairs.

Every problem is collected as one line naming the file and key, so a user sees all bad shards
at once; the CLI exits non-zero when there is any.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from shards.format import (MANIFEST_FILE, PAIRS_FILE, ShardError, check_label, check_pair, iter_pairs,
                           read_manifest, read_meta)
from shards.tario import TarCorrupt, iter_tar_groups, sha256_file


def _check_image(data: bytes) -> None:
    img = Image.open(io.BytesIO(data))
    img.load()  # full decode: a truncated JPEG fails here, not at open()


def _check_shard(path: Path, entry: dict[str, Any], problems: list[str],
                 on_group: Callable[[str, dict[str, bytes]], None]) -> int:
    if not path.is_file():
        problems.append(f"{path}: missing (listed in {MANIFEST_FILE})")
        return 0
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{path}: sha256 differs from {MANIFEST_FILE} (corrupt or modified)")
    n, prev = 0, None
    try:
        for key, files in iter_tar_groups(path):
            n += 1
            if prev is not None and key <= prev:
                problems.append(f"{path}: key {key!r}: members not sorted by key (after {prev!r})")
            prev = key
            on_group(key, files)
    except TarCorrupt as e:
        problems.append(f"{path}: truncated or unreadable after key {e.last_key!r} ({e.cause})")
    if n != entry["count"]:
        problems.append(f"{path}: {n} samples, {MANIFEST_FILE} says {entry['count']}")
    return n


def validate(root: Path, progress: bool = False) -> tuple[list[str], dict[str, int]]:
    """Return (problems, counts per split). Raises ShardError only when meta/manifest are unreadable."""
    from tqdm import tqdm

    root = Path(root)
    meta, manifest = read_meta(root), read_manifest(root)
    problems: list[str] = []
    counts: dict[str, int] = {}
    keys: dict[str, str] = {}
    for name, digest in manifest.get("files", {}).items():
        p = root / name
        if not p.is_file() or sha256_file(p) != digest:
            problems.append(f"{p}: missing or sha256 differs from {MANIFEST_FILE}")
    total = sum(v["count"] for v in manifest["splits"].values())
    bar = tqdm(total=total, desc="validate", unit="img", disable=not progress)
    for split, entry in manifest["splits"].items():
        if split not in meta.splits:
            problems.append(f"{root / MANIFEST_FILE}: split {split!r} is not declared in meta.json")
        for shard in entry["shards"]:
            path = root / shard["file"]

            def on_group(key: str, files: dict[str, bytes], path: Path = path, split: str = split) -> None:
                bar.update(1)
                where = f"{path}: key {key!r}"
                if key in keys:
                    problems.append(f"{where}: duplicate key (also in split {keys[key]!r})")
                keys[key] = split
                imgs = [e for e in ("jpg", "png") if e in files]
                if len(imgs) != 1 or "json" not in files:
                    problems.append(f"{where}: expected one jpg|png and one json member, got {sorted(files)}")
                    return
                try:
                    _check_image(files[imgs[0]])
                except Exception as e:  # noqa: BLE001 — report any decoder failure as this key's problem
                    problems.append(f"{where}: image does not decode ({e})")
                try:
                    label = json.loads(files["json"])
                    check_label(label, meta, where)
                    if label["split"] != split:
                        problems.append(f"{where}: label split {label['split']!r} in a {split!r} shard")
                except (json.JSONDecodeError, ShardError, KeyError, TypeError) as e:
                    problems.append(f"{where}: bad label ({e})")

            counts[split] = counts.get(split, 0) + _check_shard(path, shard, problems, on_group)
    bar.close()
    pairs_path = root / PAIRS_FILE
    if manifest.get("pair_splits") and not pairs_path.is_file():
        problems.append(f"{pairs_path}: missing but the manifest lists pair shards")
    if pairs_path.is_file():
        try:
            for n, p in enumerate(iter_pairs(pairs_path), start=2):
                where = f"{pairs_path}:{n}"
                try:
                    check_pair(p, meta, where)
                except ShardError as e:
                    problems.append(str(e))
                for k in (p.key_i, p.key_j):
                    if keys.get(k) != p.split:
                        problems.append(f"{where}: key {k!r} is not a sample of split {p.split!r}")
        except ShardError as e:
            problems.append(str(e))
    for split, entry in manifest.get("pair_splits", {}).items():
        for shard in entry["shards"]:
            _check_shard(root / shard["file"], shard, problems, lambda k, f: None)
    return problems, counts
