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


def test_oracle_path_metrics_against_a_channel_mean_oracle() -> None:
    """An oracle that reads attribute c as the mean of colour channel c / 255: a path that moves
    only the red channel by 40 v scores Spearman 1, non-target change 0 and AAS 1; one that also
    moves green by 10 |v| has a non-target change of 10/255 * mean|v| (the hand-computed value)."""
    import numpy as np
    from torch import nn

    from models.attr_oracle import AttrOracle
    from models.trip_eval import PATH_V, oracle_path_metrics

    class ChannelOracle(AttrOracle):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.attributes = ("red", "green", "blue")
            self.register_buffer("cols", torch.arange(3), persistent=False)

        def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            value = images.float().mean((2, 3)) / 255.0
            return {"value": value, "features": torch.cat([value, value ** 2], 1)}

    oracle = ChannelOracle()
    base = torch.tensor([90.0, 110, 130, 150, 170, 100])  # red levels; the swap splits them at 127.5
    images = torch.full((6, 3, 4, 4), 120.0)
    images[:, 0] = base.view(6, 1, 1)
    real = oracle(images)

    def path(leak: float) -> torch.Tensor:
        frames = images.repeat(len(PATH_V), 1, 1, 1, 1)
        for t, v in enumerate(PATH_V):
            frames[t, :, 0] += 40.0 * v
            frames[t, :, 1] += leak * abs(v)
        return frames.round().to(torch.uint8)

    def swap(v_k: np.ndarray) -> torch.Tensor:
        out = images.clone()
        out[:, 0] = torch.from_numpy(np.where(v_k > 0, 255.0, 0.0)).float().view(6, 1, 1)
        return out.to(torch.uint8)

    clean, _ = oracle_path_metrics(oracle, real, path(0.0), 0, [1, 2], swap, 0.5)
    # equal changes of different images differ in the last float bits, so ties within one v are not exact
    assert clean["spearman_v"] == pytest.approx(1.0, abs=5e-3)
    assert clean["nontarget_change"] == pytest.approx(0.0)
    assert clean["aas"] == 1.0
    leaky, _ = oracle_path_metrics(oracle, real, path(10.0), 0, [1, 2], swap, 0.5)
    # green moves by round(10 |v|) on each frame, blue not at all: the mean over both columns
    expected = np.mean([round(10.0 * abs(v)) / 255.0 for v in PATH_V]) / 2
    assert leaky["nontarget_change"] == pytest.approx(expected, rel=1e-6)
    assert leaky["spearman_v"] == pytest.approx(1.0, abs=5e-3)
