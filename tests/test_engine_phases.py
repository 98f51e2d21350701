"""The shared loop's multi-optimiser path (a GAN's two phases): with DeepSpeed (two engines over one
module) and without, each named optimiser steps only its own parameters when each phase's loss
keeps the other network out of the graph (models.registry.frozen / detach)."""
from __future__ import annotations


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
