"""trip's losses (Eq. 5-7, the gradient penalty, cycle, orthogonal regulariser) against loops."""
from __future__ import annotations

import pytest
import torch

from models.losses import (cycle_l1, gradient_penalty, lsgan_discriminator_loss, lsgan_generator_loss,
                           orthogonal_regulariser, trip_generator_rank_loss, trip_ranker_loss)


def test_rank_losses_match_eq7_written_as_loops() -> None:
    torch.manual_seed(0)
    b, k = 5, 2
    r_real, target = torch.randn(b, k, dtype=torch.float64), torch.tensor([[1, -1], [0, 1], [-1, 0], [1, 1], [0, 0]])
    r_fake, v = torch.randn(b, k, dtype=torch.float64), torch.rand(b, k, dtype=torch.float64) * 2 - 1
    real = sum(sum((float(r_real[i, j]) - float(target[i, j])) ** 2 for j in range(k)) for i in range(b)) / b
    fake = sum(sum(float(r_fake[i, j]) ** 2 for j in range(k)) for i in range(b)) / b
    assert trip_ranker_loss(r_real, target, r_fake, 0.5).item() == pytest.approx(real + 0.5 * fake)
    known = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    real_known = sum((float(r_real[i, j]) - float(target[i, j])) ** 2 for i in range(b) for j in range(k) if known[i, j]) / b
    assert trip_ranker_loss(r_real, target, r_fake, 0.5, known).item() == pytest.approx(real_known + 0.5 * fake)
    gen = sum(sum((float(r_fake[i, j]) - float(v[i, j])) ** 2 for j in range(k)) for i in range(b)) / b
    assert trip_generator_rank_loss(r_fake, v).item() == pytest.approx(gen)
    # K = 1 (Eq. 5a / 5b) from [B] outputs
    assert trip_generator_rank_loss(r_fake[:, 0], v[:, 0]).item() == pytest.approx(
        float(((r_fake[:, 0] - v[:, 0]) ** 2).mean()))


def test_lsgan_and_cycle_losses() -> None:
    d_real, d_fake = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.25])
    assert lsgan_discriminator_loss(d_real, d_fake).item() == pytest.approx((0 + 0.25) / 2 + (0 + 0.0625) / 2)
    assert lsgan_generator_loss(d_fake).item() == pytest.approx((1 + 0.5625) / 2)
    assert cycle_l1(torch.zeros(2, 3), torch.tensor([[1.0, -1, 0], [0, 0, 2]])).item() == pytest.approx(4 / 6)


def test_gradient_penalty_of_a_known_critic() -> None:
    """critic(z) = sum(w * z^2)/2 has gradient w * z, so at the interpolate z the penalty is
    mean_b (||w * z_b|| - 1)^2; the penalty itself must be differentiable w.r.t. w (create_graph)."""
    torch.manual_seed(1)
    w = torch.randn(3, 4, requires_grad=True)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    t = torch.tensor([0.25, 0.75]).view(2, 1, 1)
    gp = gradient_penalty(lambda z: (w * z * z).sum((1, 2)) / 2, a, b, t)
    z = t * a + (1 - t) * b
    want = sum((float((w.detach() * z[i]).norm()) - 1) ** 2 for i in range(2)) / 2
    assert gp.item() == pytest.approx(want, rel=1e-5)
    gp.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    zero = gradient_penalty(lambda z: (w * z * z).sum((1, 2)) / 2, a, b, t, center=0.0)
    assert zero.item() == pytest.approx(sum(float((w.detach() * z[i]).norm()) ** 2 for i in range(2)) / 2, rel=1e-5)


def test_orthogonal_regulariser_ignores_norms_and_sees_correlation() -> None:
    w = torch.tensor([[2.0, 0, 0], [0, 3.0, 0]])  # orthogonal rows of any norm: 0
    assert orthogonal_regulariser([w]).item() == 0.0
    conv = torch.zeros(2, 1, 1, 2)
    conv[0, 0, 0] = torch.tensor([1.0, 1.0])
    conv[1, 0, 0] = torch.tensor([1.0, 0.0])  # dot product 1, counted twice (both off-diagonal entries)
    assert orthogonal_regulariser([w, conv]).item() == pytest.approx(2.0)
