"""trip's networks (papers/trip.txt, Appendix C.1, Tables 3-4), sized by config for CPU or GPU.

* `Generator` (Table 3, RelGAN's): the image concatenated with the K-dim latent v broadcast over
  the pixels -> 7x7 conv -> `n_down` stride-2 4x4 convs -> `n_res` residual blocks -> `n_down`
  stride-2 4x4 transposed convs -> 7x7 conv -> tanh. Switchable normalisation after every layer
  but the last (or instance normalisation: `norm`).
* `Ranker` (Table 4): a shared feature layer F of `n_feat` stride-2 4x4 convs with LeakyReLU(0.01);
  the rank head on F(y) - F(x): 1x1 conv, LeakyReLU, flatten, dense -> K outputs; the GAN head on
  F(image): flatten, dense -> 1 (LSGAN).
* `SwitchNorm2d` (Luo et al. 2019): written here because no maintained PyTorch package provides
  it; the normalised input mixes instance, layer and batch statistics with learned softmax weights.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class SwitchNorm2d(nn.Module):
    """(x - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) * gamma + beta, k in {IN, LN, BN};
    the BN statistics use the batch in training and running averages in eval mode."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_logits = nn.Parameter(torch.ones(3))
        self.var_logits = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_var", torch.ones(1, channels, 1, 1))
        self.eps, self.momentum = eps, momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_in = x.mean((2, 3), keepdim=True)
        var_in = x.var((2, 3), keepdim=True, unbiased=False)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean_ln ** 2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = (var_in + mean_in ** 2).mean(0, keepdim=True) - mean_bn ** 2
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn.detach(), self.momentum)
                self.running_var.lerp_(var_bn.detach(), self.momentum)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        wm, wv = torch.softmax(self.mean_logits, 0), torch.softmax(self.var_logits, 0)
        mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
        var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
        return (x - mean) / torch.sqrt(var.clamp_min(0) + self.eps) * self.weight + self.bias


def _norm(kind: str, channels: int) -> nn.Module:
    return SwitchNorm2d(channels) if kind == "switchable" else nn.InstanceNorm2d(channels, affine=True)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), _norm(norm, channels),
                                  nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  _norm(norm, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """G(x, v): images in [-1, 1] [B, 3, H, W] and v [B, K] -> translated images in [-1, 1]."""

    def __init__(self, k: int, base: int = 64, n_down: int = 2, n_res: int = 6,
                 norm: Literal["switchable", "instance"] = "switchable") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3 + k, base, 7, 1, 3, bias=False), _norm(norm, base), nn.ReLU(inplace=True)]
        ch = base
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), _norm(norm, ch * 2), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [ResidualBlock(ch, norm) for _ in range(n_res)]
        for _ in range(n_down):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), _norm(norm, ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        layers += [nn.Conv2d(ch, 3, 7, 1, 3), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.k = k

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cond = v.to(x.dtype).view(len(v), self.k, 1, 1).expand(-1, -1, x.shape[2], x.shape[3])
        return self.net(torch.cat([x, cond], 1))


class Ranker(nn.Module):
    """rank(x, y) -> [B, K] (positive when y shows more of attribute k than x); gan(x) -> [B]."""

    def __init__(self, k: int, image_size: int, base: int = 64, n_feat: int = 6) -> None:
        super().__init__()
        if image_size % (2 ** n_feat):
            raise ValueError(f"image size {image_size} is not divisible by 2^{n_feat} (the ranker's feature layers)")
        layers: list[nn.Module] = []
        cin, ch = 3, base
        for _ in range(n_feat):
            layers += [nn.Conv2d(cin, ch, 4, 2, 1), nn.LeakyReLU(0.01, inplace=True)]
            cin, ch = ch, ch * 2
        side = image_size // 2 ** n_feat
        # identity at the configured size; lets another input size through (the dense heads are sized for `side`)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(side))
        self.rank_conv = nn.Sequential(nn.Conv2d(cin, 1, 1), nn.LeakyReLU(0.01))
        self.rank_fc = nn.Linear(side * side, k)
        self.gan_fc = nn.Linear(cin * side * side, 1)

    def rank_from_features(self, fx: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
        return self.rank_fc(self.rank_conv(fy - fx).flatten(1))

    def gan_from_features(self, f: torch.Tensor) -> torch.Tensor:
        return self.gan_fc(f.flatten(1)).squeeze(1)

    def rank(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.features(torch.cat([x, y], 0))  # one pass over both images of every pair
        fx, fy = f.chunk(2)
        return self.rank_from_features(fx, fy)

    def gan(self, x: torch.Tensor) -> torch.Tensor:
        return self.gan_from_features(self.features(x))
