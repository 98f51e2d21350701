"""Every registered method: build, one step, finite losses, gradients reach every trainable parameter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.cli_train import resolve_config_class
from jobs.config import build
from models import registry
from models.registry import StepInfo
from shards.augment import AugmentConfig
from shards.format import read_meta
from shards.reader import LoaderConfig, make_loader


@pytest.mark.parametrize("name", list(registry.names()))
def test_one_step_builds_trains_and_reaches_every_parameter(name: str, tiny_attrworld: Path) -> None:
    method = registry.get(name)
    cfg = build(resolve_config_class(name), {})
    meta = read_meta(tiny_attrworld)
    if method.prepare_meta is not None:
        meta = method.prepare_meta(meta, tiny_attrworld, "train")
    torch.manual_seed(0)
    model = method.build(cfg.model, meta)
    kind = {"pairs": ("pairs", "none"), "samples": ("samples", "none"), "class_balanced": ("samples", "class_balanced")}
    k, batching = kind[method.data_kind]
    loader = make_loader(tiny_attrworld, "train", mode="train", kind=k, batching=batching, rank=0, world_size=1,
                         cfg=LoaderConfig(batch_size=6, num_workers=0, shuffle_buffer=32, classes_per_batch=2,
                                          images_per_class=2),
                         augment=AugmentConfig(resize=32, size=28))
    batch = next(iter(loader))
    groups = method.optim_groups(model, cfg.model)
    grouped = [p for gs in groups.values() for g in gs for p in g.params]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable), "each trainable parameter in one group"
    reached: set[int] = set()
    # first and last step: methods with stages (stn_ranker's two-stage schedule) use every part by the end
    for step in (0, cfg.schedule.max_steps - 1):
        model.zero_grad(set_to_none=True)
        out = method.step(model, batch, cfg.model, StepInfo(step=step, max_steps=cfg.schedule.max_steps,
                                                            device=torch.device("cpu")))
        assert set(out) == set(groups)
        for loss in out.values():
            assert loss.ndim == 0 and torch.isfinite(loss)
            loss.backward(retain_graph=True)
        reached |= {id(p) for p in trainable if p.grad is not None and p.grad.abs().sum() > 0}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached]
    assert not missing, f"no gradient reached {missing[:5]}"
