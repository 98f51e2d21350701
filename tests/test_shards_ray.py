"""The reader inside real Ray Train workers: ranks come from the process group Ray sets up."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.writer import write_dataset
from tests import toy


def _worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from shards.augment import AugmentConfig
    from shards.reader import LoaderConfig, make_loader

    root, out = Path(config["root"]), Path(config["out"])
    rank = ray.train.get_context().get_world_rank()
    assert dist.is_initialized() and dist.get_rank() == rank
    aug = AugmentConfig(resize=16, size=14)
    cfg = LoaderConfig(batch_size=3, num_workers=2, shuffle_buffer=4)
    # no rank/world_size passed: the reader takes them from torch.distributed
    eval_keys = [k for b in make_loader(root, "train", mode="eval", cfg=cfg, augment=aug) for k in b["key"]]
    train = make_loader(root, "train", mode="train", cfg=cfg, augment=aug)
    n_batches = sum(1 for _ in train)
    (out / f"rank{rank}.json").write_text(json.dumps({"eval": eval_keys, "train_batches": n_batches}))


@pytest.mark.slow
def test_reader_splits_by_rank_inside_ray_train_workers(ray_session: object, tmp_path: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    root = tmp_path / "toy"
    write_dataset(toy.plan(n_train=34, pairs=False), root, shard_size=5, progress=False)
    trainer = TorchTrainer(
        _worker, train_loop_config={"root": str(root), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="reader", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    keys = got[0]["eval"] + got[1]["eval"]
    assert len(keys) == len(set(keys)) == 34 and got[0]["eval"] and got[1]["eval"]
    assert got[0]["train_batches"] == got[1]["train_batches"] == 34 // (2 * 3)
