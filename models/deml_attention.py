"""deml's attention modules (Chen & Deng, CVPR 2019, papers/deml.txt Sec. 3.1-3.2).

* Object-attention module (OAM, Sec. 3.1), parameter-free and gradient-free:
  `random_walk_map` builds the fully connected graph over the locations of one conv map with edge
  weights ||u_a - u_b|| (Eq. 2; optionally x the authors' spatial Gaussian), normalises each node's
  out-bound weights to 1 and propagates mass T = 10 times from uniform (Eq. 3). Mass flows along
  the edges (M_b <- sum_a M_a P_ab): the paper's "M <- D M" with D the transpose of the
  row-normalised matrix (the authors' code column-normalises), since a row-stochastic D times a
  uniform M stays uniform. `attention_map` resizes each map to the input, min-max normalises and
  averages them; `crop_boxes` follows the authors' code: threshold at the mean, largest connected
  region, its bounding box squared to side (w + h) / 2 about its centre, clipped to the image;
  `crop_and_zoom` cuts the box and resizes it to the input size (torchvision's roi_align:
  bilinear, no gradient needed).
* Channel-attention module (CAM, Sec. 3.2): `ChannelAttention`, the paper's pooled SE form
  (avg pool, FC C->64, ReLU, FC 64->C, sigmoid, channel reweighting) or the authors' spatial form
  (1x1 convs, no pooling).
* Adversary network F^i (Eq. 4), used behind a gradient reversal layer (models/losses.py).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def random_walk_map(fmap: torch.Tensor, steps: int = 10, spatial_sigma: float = 0.0) -> torch.Tensor:
    """Eq. 2-3 on a conv map [B, C, h, w] -> the stationary mass [B, h, w] (sums to 1 per image).

    spatial_sigma > 0 multiplies each edge by exp(-dist^2 / (2 (sigma * max(h, w))^2)) (the
    authors' code uses 0.15); 0 = the paper's Eq. 2 alone."""
    b, c, h, w = fmap.shape
    n = h * w
    u = fmap.float().flatten(2).transpose(1, 2)  # [B, N, C]
    d = torch.cdist(u, u)  # d[a, b] = weight of the edge a -> b (symmetric here)
    if spatial_sigma > 0:
        yy, xx = torch.meshgrid(torch.arange(h, device=u.device), torch.arange(w, device=u.device), indexing="ij")
        pos = torch.stack([yy.flatten(), xx.flatten()], 1).float()
        d = d * torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * (spatial_sigma * max(h, w)) ** 2))
    out = d.sum(-1, keepdim=True)
    # a node with no out-bound weight (features identical everywhere) walks uniformly
    p = torch.where(out > 0, d / out.clamp_min(1e-12), torch.full_like(d, 1.0 / n))
    m = torch.full((b, 1, n), 1.0 / n, device=u.device)
    for _ in range(steps):
        m = m @ p  # M_b <- sum_a M_a P_ab
    return m.view(b, h, w)


@torch.no_grad()
def attention_map(maps: list[torch.Tensor], size: tuple[int, int], steps: int = 10,
                  spatial_sigma: float = 0.0) -> torch.Tensor:
    """The object-attention proposal [B, H, W] in [0, 1]: each conv map's random-walk mass,
    resized to the input (bilinear), min-max normalised per image, averaged over the maps."""
    out = []
    for fmap in maps:
        m = random_walk_map(fmap, steps, spatial_sigma)[:, None]
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)[:, 0]
        lo = m.flatten(1).min(1).values[:, None, None]
        hi = m.flatten(1).max(1).values[:, None, None]
        out.append((m - lo) / (hi - lo).clamp_min(1e-12))
    return torch.stack(out).mean(0)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage  # connected components (scipy ships with scikit-learn)

    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == 1 + int(np.argmax(sizes))


def square_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int,
               min_side: float) -> tuple[float, float, float, float]:
    """The authors' squaring: side (w + h) / 2 (at least `min_side`) about the box centre, clipped."""
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max((x1 - x0 + y1 - y0) / 2, min_side) / 2
    return (max(0.0, cx - half), max(0.0, cy - half), min(float(width), cx + half), min(float(height), cy + half))


@torch.no_grad()
def crop_boxes(att: torch.Tensor, min_frac: float = 0.25) -> torch.Tensor:
    """Object-attention proposals [B, H, W] -> square crop boxes [B, 4] (x0, y0, x1, y1 in pixels,
    x1/y1 exclusive): threshold at the map's mean, the largest connected region's bounding box,
    squared and clipped. A flat map gives the whole image; boxes are at least min_frac x the side.
    min_frac >= 1 gives every image whole (no zoom: the ablation that keeps I backbones but not the OAM)."""
    a = att.float().cpu().numpy()
    _, h, w = a.shape
    boxes = []
    for m in a:
        mask = m > m.mean()
        if min_frac >= 1 or not mask.any():
            boxes.append((0.0, 0.0, float(w), float(h)))
            continue
        ys, xs = np.nonzero(_largest_region(mask))
        boxes.append(square_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, w, h, min_frac * min(h, w)))
    return torch.tensor(boxes, dtype=torch.float32, device=att.device)


@torch.no_grad()
def crop_and_zoom(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Cut each box out of float images [B, C, H, W] and resize it to `size` (default H, W)."""
    from torchvision.ops import roi_align

    size = size or (images.shape[-2], images.shape[-1])
    rois = torch.cat([torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None], boxes], 1)
    return roi_align(images.float(), rois.to(images.device), output_size=size, spatial_scale=1.0,
                     sampling_ratio=2, aligned=True)


class ChannelAttention(nn.Module):
    """CAM_(i,j): U -> U x sigma(W2 relu(W1 pool(U))) (paper, 'se') or the authors' spatial form
    U x sigma(conv1x1(relu(conv1x1(U)))) ('spatial'). forward -> (proposal, weights)."""

    def __init__(self, channels: int, hidden: int = 64, kind: Literal["se", "spatial"] = "se") -> None:
        super().__init__()
        self.kind = kind
        if kind == "se":
            self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        else:
            self.fc = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "se":
            w = torch.sigmoid(self.fc(u.mean((2, 3))))
            return u * w[:, :, None, None], w
        w = torch.sigmoid(self.fc(u))
        return u * w, w.mean((2, 3))


class Adversary(nn.Module):
    """F^i of Eq. 4, fed the L2-normalised CA learner outputs of one scale (Fig. 3c gives no more
    than "a network"; the two obvious networks both lose the game trivially, so the default is ours).

    'orthogonal' (default): F(z) = (W z)^2, W with orthonormal rows (torch's orthogonal
    parametrisation), out_dim < dim. A free network minimises Eq. 4 by shrinking to a constant
    (the reversed gradient then vanishes); a linear one is beaten by learners that are negations
    of each other (z' = -z maximises ||F z - F z'|| yet adds no information). Squared orthonormal
    projections can do neither: F picks the directions where the learners' energy agrees most,
    and the learners are pushed to spread differently over every direction.
    'linear': W z alone; 'mlp': an unconstrained two-layer ReLU MLP (the plain reading of Fig. 3c)."""

    def __init__(self, dim: int, out_dim: int, kind: Literal["orthogonal", "linear", "mlp"] = "orthogonal") -> None:
        super().__init__()
        self.square = kind == "orthogonal"
        if kind in ("orthogonal", "linear"):
            self.net: nn.Module = nn.utils.parametrizations.orthogonal(nn.Linear(dim, min(out_dim, dim), bias=False))
        else:
            self.net = nn.Sequential(nn.Linear(dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.net(z)
        return y * y if self.square else y
