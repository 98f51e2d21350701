"""Reader: rank x loader-worker splitting, epochs, pairs, class-balanced batches, corruption."""
from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from shards.augment import AugmentConfig
from shards.format import ShardError
from shards.reader import LoaderConfig, ShardStream, iter_samples, make_loader
from shards.writer import write_dataset
from tests import toy

AUG = AugmentConfig(resize=16, size=14, hflip=True)


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "toy"
    # 7 train shards: deliberately not divisible by 2 ranks x 2 workers
    write_dataset(toy.plan(n_train=34, n_test=13), out, shard_size=5, progress=False)
    return out


def _keys(loader) -> list[str]:
    return [k for b in loader for k in b["key"]]


def test_eval_pass_reads_every_sample_exactly_once_over_2_ranks_x_2_workers(ds: Path) -> None:
    cfg = LoaderConfig(batch_size=3, num_workers=2)
    per_rank = [_keys(make_loader(ds, "train", mode="eval", cfg=cfg, augment=AUG, rank=r, world_size=2)) for r in range(2)]
    allkeys = per_rank[0] + per_rank[1]
    assert len(allkeys) == len(set(allkeys)) == 34
    assert set(allkeys) == {f"train_{i:05d}" for i in range(34)}
    assert per_rank[0] and per_rank[1]


def test_train_epoch_gives_equal_full_batches_per_rank_deterministically(ds: Path) -> None:
    cfg = LoaderConfig(batch_size=4, num_workers=2, shuffle_buffer=6, seed=3)

    def run(rank: int, epoch: int) -> list[list[str]]:
        loader = make_loader(ds, "train", mode="train", cfg=cfg, augment=AUG, rank=rank, world_size=2)
        loader.dataset.set_epoch(epoch)
        batches = list(loader)
        assert all(b["image"].shape == (4, 3, 14, 14) for b in batches)  # never a short batch
        return [b["key"] for b in batches]

    r0, r1 = run(0, 0), run(1, 0)
    assert len(r0) == len(r1) == 34 // (2 * 4)  # samples_per_epoch defaults to the split size
    assert run(0, 0) == r0  # same (seed, epoch, rank) -> same stream
    assert run(0, 1) != r0  # a new epoch reshuffles
    assert sorted(sum(r0, [])) != sorted(sum(r1, []))  # ranks read different shards


def test_samples_per_epoch_sets_the_batch_count(ds: Path) -> None:
    cfg = LoaderConfig(batch_size=2, num_workers=0, shuffle_buffer=4, samples_per_epoch=40)
    stream = ShardStream(ds, "train", mode="train", cfg=cfg, augment=AUG, rank=1, world_size=2)
    assert stream.batches_per_epoch() == 10
    assert len(list(make_loader(ds, "train", mode="train", cfg=cfg, augment=AUG, rank=1, world_size=2))) == 10


def test_pair_batches_carry_both_images_and_the_right_label(ds: Path) -> None:
    cfg = LoaderConfig(batch_size=4, num_workers=0, shuffle_buffer=1)
    plain = AugmentConfig(resize=16, size=16, hflip=False)
    want = {}
    for r in iter_samples(ds, "train"):
        want[r["key"]] = r["label"]["attributes"]["bright"]
    n = 0
    for b in make_loader(ds, "train", mode="eval", kind="pairs", cfg=cfg, augment=plain):
        for i in range(len(b["label"])):
            va, vb = b["attributes_a"][i, 0].item(), b["attributes_b"][i, 0].item()
            assert va == pytest.approx(want[b["key_a"][i]]) and vb == pytest.approx(want[b["key_b"][i]])
            d = va - vb
            assert b["label"][i].item() == (1.0 if d > 0.05 else 0.0 if d < -0.05 else 0.5)
            # the bright square of image a really is brighter when its label says so
            ca = b["image_a"][i, 1, 6:10, 6:10].float().mean()
            cb = b["image_b"][i, 1, 6:10, 6:10].float().mean()
            if b["label"][i].item() != 0.5:
                assert (ca > cb) == (b["label"][i].item() == 1.0)
            n += 1
    assert n == 33 and (b["attribute"] == 0).all()


def test_class_balanced_batches_hold_P_classes_with_m_images(ds: Path) -> None:
    cfg = LoaderConfig(num_workers=2, shuffle_buffer=12, classes_per_batch=2, images_per_class=3, class_field="instance")
    loader = make_loader(ds, "train", mode="train", cfg=cfg, augment=AUG, batching="class_balanced", rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == 34 // 6
    for b in batches:
        assert b["image"].shape[0] == 6
        assert sorted(Counter(b["instance"]).values()) == [3, 3]


def test_class_balanced_says_what_to_change_when_classes_are_too_few(ds: Path) -> None:
    cfg = LoaderConfig(num_workers=0, shuffle_buffer=4, classes_per_batch=9, images_per_class=2)
    with pytest.raises(ShardError, match="raise data.shuffle_buffer or lower data.classes_per_batch"):
        list(make_loader(ds, "train", mode="train", cfg=cfg, augment=AUG, batching="class_balanced"))


def test_boxes_follow_crop_and_flip(ds: Path) -> None:
    cfg = LoaderConfig(batch_size=8, num_workers=0, shuffle_buffer=4)
    aug = AugmentConfig(resize=40, size=32, hflip=True)
    for b in make_loader(ds, "train", mode="train", cfg=cfg, augment=aug):
        for img, box, bright in zip(b["image"], b["boxes"][:, 0], b["attributes"][:, 0]):
            x0, y0, x1, y1 = (box * 32).round().int().tolist()
            inside = img[1, y0 + 2:y1 - 2, x0 + 2:x1 - 2].float().mean()
            mask = torch.ones(32, 32, dtype=torch.bool)
            mask[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
            outside = img[1][mask].float().mean()
            assert inside > outside + 30, (box, bright)


def _corrupt_one_image(ds: Path, tmp: Path, key: str) -> Path:
    import shutil

    out = tmp / "corrupt"
    shutil.copytree(ds, out)
    for line in (out / "index" / "train.tsv").read_text().splitlines()[1:]:
        k, shard, off, size, *_ = line.split("\t")
        if k == key:
            with open(out / shard, "r+b") as f:
                f.seek(int(off))
                f.write(b"\x00" * int(size))  # same length: the tar stays well-formed, the PNG does not
            return out
    raise AssertionError(key)


def test_corrupt_sample_is_logged_counted_and_skipped_in_training(ds: Path, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    bad = _corrupt_one_image(ds, tmp_path, "train_00007")
    cfg = LoaderConfig(batch_size=4, num_workers=0, shuffle_buffer=4, samples_per_epoch=136)
    with caplog.at_level(logging.WARNING):
        batches = list(make_loader(bad, "train", mode="train", cfg=cfg, augment=AUG))
    assert len(batches) == 34 and all(b["image"].shape[0] == 4 for b in batches)
    assert sum(int(b["skipped"].sum()) for b in batches) >= 1
    assert "train_00007" not in {k for b in batches for k in b["key"]}
    assert any("train_00007" in r.message and "train-000001.tar" in r.message for r in caplog.records)
    # evaluation skips it too, everything else is read once
    keys = _keys(make_loader(bad, "train", mode="eval", cfg=cfg, augment=AUG))
    assert len(keys) == 33 and "train_00007" not in keys


def test_truncated_shard_is_skipped_and_the_pass_continues(ds: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(ds, bad)
    shard = bad / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    cfg = LoaderConfig(batch_size=5, num_workers=0)
    batches = list(make_loader(bad, "train", mode="eval", cfg=cfg, augment=AUG))
    keys = [k for b in batches for k in b["key"]]
    assert {f"train_{i:05d}" for i in range(15, 34)} <= set(keys)  # later shards still read
    assert len(keys) < 34 and sum(int(b["skipped"].sum()) for b in batches) == 34 - len(keys)  # each lost sample


def test_missing_shard_and_empty_or_unknown_split_are_clear_errors(ds: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "missing"
    shutil.copytree(ds, bad)
    (bad / "train-000003.tar").unlink()
    cfg = LoaderConfig()
    with pytest.raises(ShardError, match=r"train-000003.tar: shard listed in manifest.json is missing"):
        make_loader(bad, "train", mode="train", cfg=cfg, augment=AUG)
    with pytest.raises(ShardError, match=r"no split 'val'; available: \['test', 'train'\]"):
        make_loader(ds, "val", mode="eval", cfg=cfg, augment=AUG)
    with pytest.raises(ShardError, match="manifest.json: missing"):
        make_loader(tmp_path, "train", mode="eval", cfg=cfg, augment=AUG)
    p = toy.plan(pairs=False)
    with_val = dataclasses.replace(p, meta=dataclasses.replace(p.meta, splits=("train", "val", "test")))
    write_dataset(with_val, tmp_path / "empty", shard_size=5, progress=False)
    with pytest.raises(ShardError, match="split 'val' is empty"):
        make_loader(tmp_path / "empty", "val", mode="eval", cfg=cfg, augment=AUG)


def test_pair_attribute_filter_keeps_only_those_pairs(tiny_attrworld: Path) -> None:
    from shards.format import read_meta

    smile = read_meta(tiny_attrworld).attribute_names.index("smile")
    cfg = LoaderConfig(batch_size=4, num_workers=0, shuffle_buffer=8, samples_per_epoch=40)
    aug = AugmentConfig(resize=32, size=28)
    everything = {int(a) for b in make_loader(tiny_attrworld, "train", mode="train", kind="pairs", cfg=cfg,
                                              augment=aug) for a in b["attribute"]}
    assert len(everything) > 1
    got = [int(a) for b in make_loader(tiny_attrworld, "train", mode="train", kind="pairs", cfg=cfg, augment=aug,
                                       pair_attributes=("smile",)) for a in b["attribute"]]
    assert len(got) == 40 and set(got) == {smile}
    with pytest.raises(ShardError, match=r"has no pairs of \['glasses'\]"):  # binary: never compared
        list(make_loader(tiny_attrworld, "train", mode="train", kind="pairs", cfg=cfg, augment=aug,
                         pair_attributes=("glasses",)))
    with pytest.raises(ShardError, match=r"pair attributes \['size'\] are not in"):
        make_loader(tiny_attrworld, "train", mode="train", kind="pairs", cfg=cfg, augment=aug, pair_attributes=("size",))
