"""The spatial transformer of stn_ranker (Singh & Lee, ECCV 2016, Eq. 1): localiser, warp, boxes.

Coordinates follow `F.affine_grid(..., align_corners=False)`: an image spans [-1, 1] on both axes
(-1 = the outer edge of the first pixel), x to the right, y down, centre 0. The transformation
is isotropic scale + translation, as in the authors' code,

    theta = [[s, 0, s*tx],
             [0, s, s*ty]],   (x_in, y_in) = s * (x_out + tx, y_out + ty),

so the crop is the square of centre (s*tx, s*ty) and half-side |s|, i.e. the box
[s*tx - s, s*tx + s] x [s*ty - s, s*ty + s] in normalised coordinates. `crop_box` reports it as
(x0, y0, x1, y1) in [0, 1] image coordinates (u = (x + 1) / 2). Samples outside the image are
zeros of the *normalised* input, i.e. the ImageNet mean colour (the authors subtract the mean
before their sampler too).

Localiser (authors' layout): pool5 -> 1x1 conv (256 -> 128) -> ReLU -> FC (4608 -> 128) -> ReLU
-> heads. The last layer (the paper's FC 128 -> 3) is split into a scale head (K outputs) and a
translation head (2K outputs: tx, ty per attribute) so that each can get its own learning rate.
Scale = scale_ratio * head output, with zero weights and bias init_scale / scale_ratio (every
image starts at scale init_scale); translation weights ~ U(+-gain / sqrt(fan_in)) (Torch7's default
Linear init for gain 1), bias 0 (translation starts random and small).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import Trunk

# backbone -> (1x1 conv channels, hidden FC width); alexnet: 128 x 6 x 6 = 4608 -> 128 as in the paper
LOCALISER_DIMS: dict[str, tuple[int, int]] = {"alexnet": (128, 128), "small": (16, 64)}


def make_theta(s: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """[N] scale and translations -> [N, 2, 3] affine matrices [[s, 0, s*tx], [0, s, s*ty]]."""
    z = torch.zeros_like(s)
    return torch.stack([torch.stack([s, z, s * tx], -1), torch.stack([z, s, s * ty], -1)], -2)


def warp(images: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear crops [N, C, size, size] of float `images` [N, C, H, W] (float32, autocast off)."""
    with torch.autocast(images.device.type, enabled=False):
        grid = F.affine_grid(theta.float(), [images.shape[0], images.shape[1], size, size], align_corners=False)
        return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def crop_box(theta: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """[..., 2, 3] affine matrices -> [..., 4] crop boxes (x0, y0, x1, y1) in [0, 1] image coordinates.

    Not clipped by default (a crop may extend past the image); `clip=True` clamps to [0, 1].
    """
    cx, cy = theta[..., 0, 2], theta[..., 1, 2]
    hx, hy = theta[..., 0, 0].abs(), theta[..., 1, 1].abs()
    box = torch.stack([cx - hx, cy - hy, cx + hx, cy + hy], -1).add(1).mul(0.5)
    return box.clamp(0, 1) if clip else box


class Localiser(nn.Module):
    """Image -> (s, tx, ty), each [N, K] (one transformation per ranked attribute)."""

    def __init__(self, trunk: Trunk, reduce: int, hidden: int, n_attributes: int, scale_ratio: float,
                 init_scale: float, translation_init_gain: float) -> None:
        super().__init__()
        self.trunk = trunk
        self.reduce = nn.Conv2d(trunk.out_channels, reduce, 1)
        self.fc = nn.Linear(reduce * trunk.out_size ** 2, hidden)
        self.scale_head = nn.Linear(hidden, n_attributes)
        self.translation_head = nn.Linear(hidden, 2 * n_attributes)
        self.scale_ratio = scale_ratio
        nn.init.zeros_(self.scale_head.weight)
        nn.init.constant_(self.scale_head.bias, init_scale / scale_ratio)
        bound = translation_init_gain / math.sqrt(hidden)
        nn.init.uniform_(self.translation_head.weight, -bound, bound)
        nn.init.zeros_(self.translation_head.bias)

    def base_parameters(self) -> list[nn.Parameter]:
        """Everything but the two heads (trunk, 1x1 conv, hidden FC)."""
        return [*self.trunk.parameters(), *self.reduce.parameters(), *self.fc.parameters()]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(torch.flatten(self.reduce(self.trunk(x)), 1))
        h = F.relu(self.fc(h))
        s = self.scale_ratio * self.scale_head(h).float()
        t = self.translation_head(h).float().unflatten(1, (-1, 2))
        return s, t[..., 0], t[..., 1]
