"""trip's networks: shapes, output range, the rank head's antisymmetry, switchable normalisation."""
from __future__ import annotations

import pytest
import torch

from models.trip_nets import Generator, Ranker, SwitchNorm2d


@pytest.mark.parametrize("norm", ["switchable", "instance"])
def test_generator_shape_range_and_conditioning(norm: str) -> None:
    torch.manual_seed(0)
    g = Generator(k=2, base=8, n_down=2, n_res=2, norm=norm)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = g(x, torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.5, 0.5]]))
    assert y.shape == x.shape and float(y.detach().abs().max()) <= 1.0
    assert not torch.allclose(g(x, torch.zeros(3, 2)), g(x, torch.ones(3, 2)))  # v changes the output


def test_ranker_heads_shapes_and_antisymmetry() -> None:
    torch.manual_seed(1)
    r = Ranker(k=3, image_size=32, base=8, n_feat=3)
    x, y = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    assert r.rank(x, y).shape == (4, 3) and r.gan(x).shape == (4,)
    same = r.rank(x, x)  # F(x) - F(x) = 0: every pair of an image with itself scores the same constant
    assert torch.allclose(same, same[:1].expand_as(same), atol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        Ranker(k=1, image_size=40, n_feat=4)


def test_switchnorm_reduces_to_instance_norm_and_tracks_batch_stats() -> None:
    torch.manual_seed(2)
    sn = SwitchNorm2d(4)
    with torch.no_grad():  # all weight on the instance statistics
        sn.mean_logits.copy_(torch.tensor([50.0, 0, 0]))
        sn.var_logits.copy_(torch.tensor([50.0, 0, 0]))
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    assert torch.allclose(sn(x), torch.nn.functional.instance_norm(x, eps=1e-5), atol=1e-4)
    with torch.no_grad():  # all weight on the batch statistics
        sn.mean_logits.copy_(torch.tensor([0, 0, 50.0]))
        sn.var_logits.copy_(torch.tensor([0, 0, 50.0]))
    bn = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    assert torch.allclose(sn(x), bn, atol=1e-4)
    assert sn.running_mean.abs().sum() > 0  # running statistics move in training mode
