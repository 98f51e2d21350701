"""Writer: determinism, resume, stale shards, input errors, WebDataset compatibility."""
from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from pathlib import Path

import pytest

from shards.format import Pair, ShardError, read_manifest
from shards.plan import DatasetPlan
from shards.writer import write_dataset
from tests import toy


def _digests(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _inodes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in root.glob("*.tar")}


def test_same_plan_gives_byte_identical_shards_whatever_the_worker_count(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(toy.plan(), a, shard_size=5, workers=1, progress=False)
    write_dataset(toy.plan(), b, shard_size=5, workers=2, progress=False)
    da, db = _digests(a), _digests(b)
    assert da.keys() == db.keys() and len([n for n in da if n.endswith(".tar")]) == 14
    assert da == db
    # a different seed changes the content
    c = tmp_path / "c"
    write_dataset(toy.plan(seed=1), c, shard_size=5, workers=1, progress=False)
    assert _digests(c)["train-000000.tar"] != da["train-000000.tar"]


def test_members_sorted_by_key_and_counts_in_manifest(tmp_path: Path) -> None:
    m = write_dataset(toy.plan(n_train=13), tmp_path / "d", shard_size=5, progress=False)
    assert [s["count"] for s in m["splits"]["train"]["shards"]] == [5, 5, 3]
    with tarfile.open(tmp_path / "d" / "train-000001.tar") as tf:
        names = tf.getnames()
    assert names == sorted(names) and names[:2] == ["train_00005.json", "train_00005.png"]
    assert m["pair_splits"]["train"]["count"] == 12


def test_webdataset_library_reads_our_shards(tmp_path: Path) -> None:
    import webdataset as wds

    write_dataset(toy.plan(n_train=8, pairs=False), tmp_path / "d", shard_size=4, progress=False)
    urls = [str(tmp_path / "d" / f"train-{i:06d}.tar") for i in range(2)]
    got = [(s["__key__"], json.loads(s["json"])["split"]) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert [k for k, _ in got] == [f"train_{i:05d}" for i in range(8)]
    assert {sp for _, sp in got} == {"train"}


def test_resume_skips_verified_shards_and_rebuilds_broken_ones(tmp_path: Path) -> None:
    out = tmp_path / "d"
    write_dataset(toy.plan(), out, shard_size=5, progress=False)
    clean = _digests(out)
    before = _inodes(out)
    (out / "train-000002.tar").write_bytes(b"garbage")  # corrupt: checksum no longer verifies
    (out / "test-000001.tar").unlink()  # missing
    write_dataset(toy.plan(), out, shard_size=5, progress=False)
    after = _inodes(out)
    rebuilt = {n for n in after if after[n] != before.get(n)}
    # the two damaged shards are rebuilt, plus pair shards that read from them; the rest are untouched
    assert {"train-000002.tar", "test-000001.tar"} <= rebuilt
    assert "train-000000.tar" not in rebuilt and "train-000004.tar" not in rebuilt
    assert _digests(out) == clean


def _failing_load(spec: dict) -> object:
    if spec["key"] == os.environ.get("TOY_CRASH_AT"):
        raise RuntimeError("simulated crash")
    return toy.load(spec)


def test_interrupted_build_resumes_to_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, out = tmp_path / "ref", tmp_path / "d"
    write_dataset(toy.plan(pairs=False), ref, shard_size=5, progress=False)
    monkeypatch.setenv("TOY_CRASH_AT", "train_00017")  # the build dies inside the 4th shard
    crashing = dataclasses.replace(toy.plan(pairs=False), load=_failing_load)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_dataset(crashing, out, shard_size=5, progress=False)
    monkeypatch.delenv("TOY_CRASH_AT")
    done = _inodes(out)
    assert set(done) == {"train-000000.tar", "train-000001.tar", "train-000002.tar"}
    assert not (out / "manifest.json").exists()  # an unfinished build has no manifest
    write_dataset(crashing, out, shard_size=5, progress=False)
    assert all(_inodes(out)[n] == ino for n, ino in done.items())  # finished shards were not redone
    assert _digests(out) == _digests(ref)


def test_changed_specs_rebuild_and_shrinking_removes_stale_shards(tmp_path: Path) -> None:
    out = tmp_path / "d"
    write_dataset(toy.plan(n_train=24, pairs=True), out, shard_size=5, progress=False)
    write_dataset(toy.plan(n_train=9, pairs=False), out, shard_size=5, progress=False, overwrite=True)
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert read_manifest(out)["splits"]["train"]["count"] == 9
    assert not list((out / ".progress").glob("train-000004*"))
    assert not (out / "pairs.tsv").exists() and "pairs.tsv" not in read_manifest(out)["files"]  # the old plan's


def test_another_plan_in_out_is_refused_without_overwrite_and_left_intact(tmp_path: Path) -> None:
    out = tmp_path / "d"
    write_dataset(toy.plan(n_train=24), out, shard_size=5, progress=False)
    before = _digests(out)
    with pytest.raises(ShardError, match=r"another plan .*--overwrite"):
        write_dataset(toy.plan(n_train=9), out, shard_size=5, progress=False)
    assert _digests(out) == before
    write_dataset(toy.plan(n_train=24), out, shard_size=5, progress=False)  # the same plan resumes as before
    assert _digests(out) == before
    (out / "manifest.json").unlink()  # an unfinished build of the first plan: still recognised (.progress/plan.json)
    with pytest.raises(ShardError, match="another plan"):
        write_dataset(toy.plan(n_train=9), out, shard_size=5, progress=False)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ShardError, match="is a file"):
        write_dataset(toy.plan(), afile, shard_size=5, progress=False)
    assert afile.read_text() == "mine"


def test_refuses_a_non_empty_foreign_directory_and_keeps_its_files(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tar").write_bytes(b"precious")
    with pytest.raises(ShardError, match="not an attrlab shard directory"):
        write_dataset(toy.plan(), out, shard_size=5, progress=False)
    assert (out / "thesis.tar").read_bytes() == b"precious"


@pytest.mark.parametrize("mutate, message", [
    (lambda tr: tr[:3] + [dict(tr[3], key=tr[1]["key"])], "duplicate key"),
    (lambda tr: [tr[1], tr[0]], "keys must ascend"),
    (lambda tr: [dict(tr[0], split="test")], "listed under split 'train'"),
])
def test_bad_specs_are_named(tmp_path: Path, mutate, message: str) -> None:
    p = toy.plan(pairs=False)
    bad = dataclasses.replace(p, splits={"train": mutate(list(p.splits["train"])), "test": p.splits["test"]})
    with pytest.raises(ShardError, match=message):
        write_dataset(bad, tmp_path / "d", shard_size=5, progress=False)


@pytest.mark.parametrize("pair, message", [
    (Pair("train_00000", "nope", "bright", "more", "train"), "unknown sample key 'nope'"),
    (Pair("train_00000", "test_00001", "bright", "more", "train"), "is in split 'test'"),
    (Pair("train_00000", "train_00001", "bright", "bigger", "train"), "relation 'bigger'"),
    (Pair("train_00000", "train_00001", "size", "more", "train"), "attribute 'size' is not declared"),
])
def test_bad_pairs_are_named(tmp_path: Path, pair: Pair, message: str) -> None:
    p = toy.plan(pairs=False)
    with pytest.raises(ShardError, match=message):
        write_dataset(dataclasses.replace(p, pairs=[pair]), tmp_path / "d", shard_size=5, progress=False)


def test_label_outside_metadata_is_an_error_naming_the_key(tmp_path: Path) -> None:
    p = toy.plan(pairs=False)
    train = list(p.splits["train"])
    train[2] = dict(train[2], bright=1.7)
    bad: DatasetPlan = dataclasses.replace(p, splits={"train": train, "test": p.splits["test"]})
    with pytest.raises(ShardError, match=r"sample 'train_00002': attribute 'bright': value 1.7 outside \[0, 1\]"):
        write_dataset(bad, tmp_path / "d", shard_size=5, progress=False)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_parser_reads_tars_made_by_other_tools(tmp_path: Path, fmt: int) -> None:
    import io

    from shards.tario import iter_tar_groups

    long = "k" * (90 if fmt == tarfile.USTAR_FORMAT else 150)
    members = [(f"d/{long}.json", b"{}"), (f"d/{long}.png", b"x" * 700), ("d/b2.json", b"[]")]
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=fmt) as tf:
        d = tarfile.TarInfo("d")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = list(iter_tar_groups(path))
    assert got == [(long, {"json": b"{}", "png": b"x" * 700}), ("b2", {"json": b"[]"})]
    from shards.tario import TarCorrupt

    raw = path.read_bytes()
    png_at = raw.find(b"x" * 700)
    path.write_bytes(raw[:png_at + 100])  # truncated inside the png payload
    with pytest.raises(TarCorrupt, match="truncated") as e:
        list(iter_tar_groups(path))
    assert e.value.last_key is None
    flipped = bytearray(raw)
    flipped[png_at - 512 + 3] ^= 0xFF  # a bit flip inside the png's header
    path.write_bytes(bytes(flipped))
    with pytest.raises(TarCorrupt, match="checksum"):
        list(iter_tar_groups(path))
