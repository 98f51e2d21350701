"""Streaming, parallel, deterministic and resumable shard writer.

* Streaming: specs are consumed lazily and chunked into shards; a worker process renders or
  reads one sample at a time straight into its tar, so memory is bounded by the number of
  shards in flight (2 x workers), never by the dataset.
* Deterministic: shard boundaries depend only on the spec order and `shard_size`; tar members
  carry fixed metadata. Same plan + seed -> byte-identical shards, whatever `workers` is.
* Resumable: each finished shard is renamed into place atomically and recorded in
  `.progress/<shard>.json` with its sha256 and a fingerprint of its specs; a re-run skips a
  shard whose record matches and whose bytes still verify, and rebuilds anything else.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import random
from concurrent.futures import Future, ProcessPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from shards.format import (FORMAT_VERSION, KEY_RE, MANIFEST_FILE, META_FILE, PAIRS_FILE, Pair, Sample, ShardError,
                           check_pair, check_sample, write_pairs)
from shards.plan import DatasetPlan, Spec, fingerprint_of, plain_name
from shards.tario import DeterministicTarWriter, read_at, sha256_file

log = logging.getLogger(__name__)
PROGRESS_DIR = ".progress"
INDEX_DIR = "index"
PLAN_FILE = "plan.json"  # in PROGRESS_DIR: the plan being written, so a resume can tell it is the same
INDEX_HEADER = "key\tshard\toffset\tsize\text\tjson_offset\tjson_size\n"


def shard_name(split: str, n: int, kind: str = "samples") -> str:
    """A shard's file name; never a path (the split name comes from the plan's metadata)."""
    name = f"{split}-{n:06d}.tar" if kind == "samples" else f"pairs-{split}-{n:06d}.tar"
    return plain_name(name, f"split {split!r}: shard name")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _resumable(out: Path, name: str, fp: str) -> dict[str, Any] | None:
    """The progress record of a shard that is complete and verifies, else None."""
    rec_path, shard = out / PROGRESS_DIR / f"{name}.json", out / name
    if not (rec_path.is_file() and shard.is_file()):
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except json.JSONDecodeError:
        return None
    if rec.get("fingerprint") != fp or sha256_file(shard) != rec.get("sha256"):
        return None
    rec["skipped"] = True
    return rec


def _finish_shard(out: Path, name: str, tmp: Path, fp: str, count: int, index: list[list[Any]]) -> dict[str, Any]:
    os.replace(tmp, out / name)
    rec = {"file": name, "count": count, "sha256": sha256_file(out / name), "fingerprint": fp, "index": index}
    _atomic_write(out / PROGRESS_DIR / f"{name}.json", json.dumps(rec).encode())
    rec["skipped"] = False
    return rec


def _write_sample_shard(out: Path, name: str, specs: list[Spec], load: Callable[[Spec], Sample],
                        fp: str, meta_json: dict[str, Any]) -> dict[str, Any]:
    """Worker: render/read each spec and stream it into the tar (one sample in memory)."""
    if rec := _resumable(out, name, fp):
        return rec
    from shards.format import DatasetMeta

    meta = DatasetMeta.from_json(meta_json)
    tmp = out / f"{name}.tmp-{os.getpid()}"
    index: list[list[Any]] = []
    with open(tmp, "wb") as f:
        w = DeterministicTarWriter(f)
        for spec in specs:
            s = load(spec)
            if s.key != spec["key"]:
                raise ShardError(f"loader returned key {s.key!r} for spec {spec['key']!r}")
            check_sample(s, meta)
            label = json.dumps(s.label_json(), sort_keys=True).encode()
            loc = {}
            for member, data in sorted([(f"{s.key}.{s.ext}", s.image), (f"{s.key}.json", label)]):
                # members sorted by name: key, then extension; a member name is never a path
                loc[member] = w.add(plain_name(member, f"sample {s.key!r}: tar member"), data)
            (off, size), (joff, jsize) = loc[f"{s.key}.{s.ext}"], loc[f"{s.key}.json"]
            index.append([s.key, name, off, size, s.ext, joff, jsize])
        w.close()
    return _finish_shard(out, name, tmp, fp, len(specs), index)


def _write_pair_shard(out: Path, name: str, pairs: list[list[Any]], fp: str) -> dict[str, Any]:
    """Worker: materialise pairs as (a.ext, b.ext, json) samples by seeking into image shards."""
    if rec := _resumable(out, name, fp):
        return rec
    tmp = out / f"{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        w = DeterministicTarWriter(f)
        for pkey, pair, loc_i, loc_j in pairs:
            recs = {}
            for side, loc in (("a", loc_i), ("b", loc_j)):
                _, shard, off, size, ext, joff, jsize = loc
                w.add(f"{pkey}.{side}.{ext}", read_at(out / shard, off, size))
                recs[side] = json.loads(read_at(out / shard, joff, jsize))
            label = {"more": 1.0, "less": 0.0, "similar": 0.5}[pair[3]]
            doc = {"key_a": pair[0], "key_b": pair[1], "attribute": pair[2], "relation": pair[3],
                   "label": label, "split": pair[4], "label_a": recs["a"], "label_b": recs["b"]}
            w.add(f"{pkey}.json", json.dumps(doc, sort_keys=True).encode())
        w.close()
    return _finish_shard(out, name, tmp, fp, len(pairs), [])


def _chunks(it: Iterable[Any], n: int) -> Iterator[list[Any]]:
    it = iter(it)
    while chunk := list(islice(it, n)):
        yield chunk


def _checked_specs(split: str, specs: Iterable[Spec], seen: dict[str, str]) -> Iterator[Spec]:
    prev = None
    for spec in specs:
        key = spec.get("key")
        if not isinstance(key, str):
            raise ShardError(f"split {split!r}: a spec has no string 'key' ({dict(spec)!r:.120})")
        if not KEY_RE.match(key):  # keys name tar members: never '/', '..' or anything but [A-Za-z0-9_-]
            raise ShardError(f"split {split!r}: sample key {key!r} may hold only letters, digits, '_' and '-'")
        if spec.get("split") != split:
            raise ShardError(f"sample {key!r}: spec split {spec.get('split')!r} listed under split {split!r}")
        if key in seen:
            raise ShardError(f"sample {key!r}: duplicate key (already in split {seen[key]!r})")
        if prev is not None and key <= prev:
            raise ShardError(f"split {split!r}: keys must ascend, {key!r} follows {prev!r}")
        seen[key], prev = split, key
        yield spec


class _Pool:
    """A process pool with a bounded number of tasks in flight (bounded memory), or inline."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) if workers > 1 else None
        self.pending: list[Future] = []

    def run(self, tasks: Iterable[tuple[Callable[..., Any], tuple[Any, ...]]]) -> Iterator[Any]:
        """Yield results in submission order."""
        if self.ex is None:
            for fn, args in tasks:
                yield fn(*args)
            return
        for fn, args in tasks:
            self.pending.append(self.ex.submit(fn, *args))
            if len(self.pending) >= 2 * self.workers:
                yield self.pending.pop(0).result()
        while self.pending:
            yield self.pending.pop(0).result()

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(cancel_futures=True)


def write_dataset(plan: DatasetPlan, out: Path, *, shard_size: int = 1000, pair_shard_size: int | None = None,
                  workers: int = 1, progress: bool = True, overwrite: bool = False,
                  source: str | None = None) -> dict[str, Any]:
    """Write (or resume writing) `plan` into `out`; return the manifest. A shard set of another plan
    (other dataset, options, count or seed; for an import, another `source` folder) already in
    `out` is replaced only with `overwrite`."""
    from tqdm import tqdm

    if shard_size < 1:
        raise ShardError(f"--shard-size {shard_size}: must be >= 1")
    for name in plan.extra_files:  # every file lands directly in `out`, checked before anything is written
        plain_name(name, "extra file")
    for split in plan.meta.splits:  # split names become shard and index file names
        plain_name(split, "split name")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out}: is a file; choose a new or empty directory")
    if out.exists() and any(out.iterdir()) and not (out / PROGRESS_DIR).is_dir():
        raise ShardError(f"--out {out}: exists, is not empty and is not an attrlab shard directory; "
                         "choose a new or empty directory")
    _check_same_plan(out, plan, overwrite, source)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    _atomic_write(out / PROGRESS_DIR / PLAN_FILE, json.dumps({"name": plan.meta.name, "fingerprint": plan.fingerprint,
                                                             "source": source}).encode())
    (out / INDEX_DIR).mkdir(exist_ok=True)
    meta = plan.meta
    meta_json = meta.to_json()
    unknown = set(plan.splits) - set(meta.splits)
    if unknown:
        raise ShardError(f"plan has splits {sorted(unknown)} not declared in the metadata {list(meta.splits)}")
    seen: dict[str, str] = {}
    pool = _Pool(max(1, workers))
    bar = tqdm(desc=f"shards {meta.name}", unit="img", disable=not progress)
    manifest: dict[str, Any] = {"format": FORMAT_VERSION, "name": meta.name, "fingerprint": plan.fingerprint,
                                "shard_size": shard_size, "splits": {}, "pair_splits": {}}
    index: dict[str, list[Any]] = {}
    written = set()
    try:
        for split in meta.splits:
            tasks = (
                (_write_sample_shard, (out, shard_name(split, n), chunk, plan.load,
                                       fingerprint_of(plan.fingerprint, chunk), meta_json))
                for n, chunk in enumerate(_chunks(_checked_specs(split, plan.splits.get(split, ()), seen), shard_size)))
            recs = []
            idx_lines = [INDEX_HEADER]
            for rec in pool.run(tasks):
                bar.update(rec["count"])
                recs.append({k: rec[k] for k in ("file", "count", "sha256")})
                for row in rec["index"]:
                    index[row[0]] = row
                    idx_lines.append("\t".join(map(str, row)) + "\n")
                written.add(rec["file"])
            if not recs:
                log.warning("split %r of %s has no samples", split, meta.name)
            _atomic_write(out / INDEX_DIR / f"{split}.tsv", "".join(idx_lines).encode())
            manifest["splits"][split] = {"count": sum(r["count"] for r in recs), "shards": recs}
        if plan.pairs is not None:
            manifest["pair_splits"] = _write_pairs(out, plan, index, seen, pool, pair_shard_size or shard_size,
                                                   written, bar)
    finally:
        pool.close()
        bar.close()
    for name, data in plan.extra_files.items():
        _atomic_write(out / name, data)
    _atomic_write(out / META_FILE, json.dumps(meta_json, indent=1, sort_keys=True).encode())
    _remove_stale(out, written)
    if plan.pairs is None:  # an earlier plan's pairs would be checksummed into this manifest
        (out / PAIRS_FILE).unlink(missing_ok=True)
    for stale in (out / INDEX_DIR).glob("*.tsv"):
        if stale.stem not in meta.splits:
            stale.unlink()
    files = {n: sha256_file(out / n) for n in sorted([META_FILE, PAIRS_FILE, *plan.extra_files]) if (out / n).is_file()}
    manifest["files"] = files
    manifest["checksum"] = fingerprint_of(manifest["splits"], manifest["pair_splits"], files)
    _atomic_write(out / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def _write_pairs(out: Path, plan: DatasetPlan, index: dict[str, list[Any]], seen: dict[str, str], pool: _Pool,
                 size: int, written: set[str], bar: Any) -> dict[str, Any]:
    by_split: dict[str, list[list[Any]]] = {}
    for n, p in enumerate(plan.pairs or ()):
        where = f"pair {n + 1} ({p.key_i}, {p.key_j}, {p.attribute})"
        check_pair(p, plan.meta, where)
        for k in (p.key_i, p.key_j):
            if k not in seen:
                raise ShardError(f"{where}: unknown sample key {k!r}; pairs must name keys of written samples")
            if seen[k] != p.split:
                raise ShardError(f"{where}: key {k!r} is in split {seen[k]!r}, the pair says {p.split!r}")
        by_split.setdefault(p.split, []).append([p.key_i, p.key_j, p.attribute, p.relation, p.split])
    tmp_pairs = out / (PAIRS_FILE + ".tmp")
    write_pairs(tmp_pairs, (Pair(*row) for split in plan.meta.splits for row in by_split.get(split, [])))
    os.replace(tmp_pairs, out / PAIRS_FILE)
    result: dict[str, Any] = {}
    for split in plan.meta.splits:
        rows = by_split.get(split)
        if not rows:
            continue
        # shuffled (deterministically) so every pair shard mixes attributes: a rank that reads a
        # subset of shards, or a model that ranks one attribute, still sees all of them
        rows = list(rows)
        random.Random(f"{plan.fingerprint}/{split}/pairs").shuffle(rows)
        items = [[f"p{i:09d}", row, index[row[0]], index[row[1]]] for i, row in enumerate(rows)]
        tasks = ((_write_pair_shard, (out, shard_name(split, n, "pairs"), chunk, fingerprint_of(plan.fingerprint, chunk)))
                 for n, chunk in enumerate(_chunks(items, size)))
        recs = []
        for rec in pool.run(tasks):
            bar.update(0)
            recs.append({k: rec[k] for k in ("file", "count", "sha256")})
            written.add(rec["file"])
        result[split] = {"count": len(rows), "shards": recs}
    return result


def _check_same_plan(out: Path, plan: DatasetPlan, overwrite: bool, source: str | None) -> None:
    """Resuming the same plan is the normal case; another plan's set is replaced only on request."""
    if not (out / PROGRESS_DIR).is_dir():
        return
    before: dict[str, Any] = {}
    for f in (out / PROGRESS_DIR / PLAN_FILE, out / MANIFEST_FILE):
        try:
            before = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(before, dict) and before.get("fingerprint"):
            break
    before = before if isinstance(before, dict) else {}
    old, old_source = before.get("fingerprint"), before.get("source")
    if old == plan.fingerprint and (old_source == source or None in (old_source, source)):
        return
    if not old:
        what = "a shard set of unknown origin"
    elif old == plan.fingerprint:  # the same importer and options, another source folder
        what = f"{plan.meta.name!r} imported from {old_source}, not {source}"
    else:
        what = (f"shard set {before.get('name')!r} built from another plan (fingerprint {old}; this build: "
                f"{plan.meta.name!r}, {plan.fingerprint}): another dataset, options, --count or --seed")
    if not overwrite:
        raise ShardError(f"--out {out}: holds {what}. Runs trained on it could no longer resume or be evaluated. "
                         "Choose a new --out, or pass --overwrite to replace it")
    log.warning("--out %s: replacing %s", out, what)


def _remove_stale(out: Path, written: set[str]) -> None:
    """Drop shards and progress records left by an earlier, larger build of this directory."""
    for rec in (out / PROGRESS_DIR).glob("*.tar.json"):
        name = rec.name[: -len(".json")]
        if name not in written:  # only files we recorded writing; never a user's own tar
            (out / name).unlink(missing_ok=True)
            rec.unlink()
    for p in out.glob("*.tmp-*"):
        p.unlink()
