"""The shared loop's multi-optimiser path (a GAN's two phases): with DeepSpeed (two engines over one
module) and without, each named optimiser steps only its own parameters when each phase's loss
keeps the other network out of the graph (models.registry.frozen / detach)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from jobs.engine import Engines
from jobs.schema import DeepSpeedSection, OptimSection, ScheduleSection
from models.registry import ParamGroup, frozen


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gen, self.critic = nn.Linear(3, 3), nn.Linear(3, 1)


@pytest.mark.parametrize("deepspeed", [True, False])
def test_each_phase_steps_only_its_own_parameters(world_of_one: None, deepspeed: bool) -> None:
    torch.manual_seed(0)
    m = Toy()
    groups = {"generator": [ParamGroup("g", list(m.gen.parameters()))],
              "critic": [ParamGroup("c", list(m.critic.parameters()))]}
    engines = Engines(m, groups, OptimSection(name="adam", lr=0.1, weight_decay=0.0), ScheduleSection(max_steps=4),
                      DeepSpeedSection(enabled=deepspeed), micro_batch=4)
    x = torch.randn(4, 3)
    fake = m.gen(x)
    with frozen(m.critic):  # the generator's loss runs through the critic without touching it
        loss_g = (m.critic(fake) - 1).pow(2).mean()
    assert all(p.requires_grad for p in m.critic.parameters())
    loss_c = m.critic(fake.detach()).pow(2).mean() + (m.critic(x) - 1).pow(2).mean()
    ref = torch.autograd.grad(loss_c, list(m.critic.parameters()), retain_graph=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for name, loss in {"generator": loss_g, "critic": loss_c}.items():  # the loop's order: backward, step
        engines.backward(name, loss)
        if name == "critic":  # the critic's gradient is its own loss's alone (nothing left by the generator's)
            assert all(torch.allclose(p.grad, r) for p, r in zip(m.critic.parameters(), ref))
        engines.step(name)
        moved = {k.split(".")[0] for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
        assert moved == {"gen" if name == "generator" else "critic"}, (name, moved)
        before = {k: v.clone() for k, v in m.state_dict().items()}



# mixed shapes and dtypes; with 64-float buckets: a tensor larger than a bucket, buckets split by dtype
_GRADS = (((3, 4), torch.float32), ((50,), torch.float32), ((2,), torch.float64), ((7, 7), torch.float32),
          ((1,), torch.float32))


def _draw(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(s, generator=g, dtype=d) for s, d in _GRADS]


def _allreduce_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from jobs.engine import allreduce_mean

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        grads = _draw(rank)
        allreduce_mean(grads, 2, bucket_bytes=64 * 4)
        torch.save(grads, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_bucketed_allreduce_averages_every_gradient_over_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_allreduce_worker, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)
    want = [(a + b) / 2 for a, b in zip(_draw(0), _draw(1))]  # the naive oracle: the elementwise mean
    for r in (0, 1):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert [(g.dtype, g.shape) for g in got] == [(w.dtype, w.shape) for w in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
