"""latent_retrieval's own latent space: a style-based autoencoder with layer-wise codes (W+).

The paper (papers/latent_retrieval.txt Sec. 3.1, 4) encodes faces into StyleGAN2's extended
latent space W+ with the pSp encoder: one code w_l per synthesis layer, s_l = A_l(w_l). No
pretrained weights can be downloaded here, so attrlab trains its own small model of the same
shape on the user's shards through the shared training loop:

* `StyleDecoder` (StyleGAN2's synthesis network, sized down): a learned 4x4 constant, then per
  resolution 4, 8, ..., image_size two 3x3 modulated convolutions with weight demodulation
  (Karras et al. 2020, Eq. 1-3, in its non-fused form), each modulated by its own style s_l = A_l(w_l); a modulated 1x1
  toRGB on the last code. L = 2 log2(image_size / 2) codes (8 at 32 px).
* `StyleEncoder` (pSp's role, sized down): a strided CNN whose pooled features map to the L codes
  through one linear layer per code.

Loss: L1 + MSE reconstruction, plus e4e's delta regulariser lambda_delta * mean ||w_l - mean_l w||^2,
which keeps the layer codes near a shared w, so that a direction fitted in W+ edits the image the
way it would in W (e4e: Tov et al. 2021, Sec. 3.3). Written here rather than imported because no
maintained package ships a trainable StyleGAN2 of this size without CUDA extensions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ModulatedConv(nn.Module):
    """3x3 (or 1x1) conv whose weights are scaled per sample by a style and demodulated."""

    def __init__(self, cin: int, cout: int, code_dim: int, kernel: int = 3, demodulate: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.affine = nn.Linear(code_dim, cin)  # A_l
        nn.init.zeros_(self.affine.weight)
        nn.init.ones_(self.affine.bias)  # style 1 at init: a plain conv
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1.0 / math.sqrt(cin * kernel * kernel)
        self.demodulate, self.pad = demodulate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.affine(w)  # [B, cin]
        # StyleGAN2's non-fused form: scale the input channels, one shared conv, then demodulate
        # the outputs; equal to per-sample modulated weights, but a plain conv (a grouped conv with
        # per-sample weights was ~10x slower on CPU)
        out = F.conv2d(x * s[:, :, None, None], self.weight * self.scale, padding=self.pad)
        if self.demodulate:
            w2 = (self.weight * self.scale).pow(2).sum((2, 3))  # [cout, cin]
            out = out * torch.rsqrt(s.pow(2) @ w2.t() + 1e-8)[:, :, None, None]
        return out + self.bias[None, :, None, None]


def n_codes(image_size: int) -> int:
    """Layer codes of the decoder: two convs per resolution 4, 8, ..., image_size."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size {image_size} must be a power of two >= 8")
    return 2 * (int(math.log2(image_size)) - 1)


class StyleDecoder(nn.Module):
    """W+ codes [B, L, code_dim] -> images in [-1, 1] [B, 3, S, S]."""

    def __init__(self, image_size: int, code_dim: int, base: int) -> None:
        super().__init__()
        self.n_res = int(math.log2(image_size)) - 1  # resolutions 4 .. image_size
        ch = [min(base * 2 ** max(0, self.n_res - 1 - i), base * 4) for i in range(self.n_res)]
        self.const = nn.Parameter(torch.randn(1, ch[0], 4, 4))
        self.convs = nn.ModuleList()
        cin = ch[0]
        for c in ch:
            self.convs.append(ModulatedConv(cin, c, code_dim))
            self.convs.append(ModulatedConv(c, c, code_dim))
            cin = c
        self.to_rgb = ModulatedConv(cin, 3, code_dim, kernel=1, demodulate=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        x = self.const.expand(len(codes), -1, -1, -1)
        for i, conv in enumerate(self.convs):
            if i and i % 2 == 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.leaky_relu(conv(x, codes[:, i]), 0.2)
        return torch.tanh(self.to_rgb(x, codes[:, -1]))


class StyleEncoder(nn.Module):
    """images in [-1, 1] -> W+ codes [B, L, code_dim]."""

    def __init__(self, image_size: int, code_dim: int, base: int, n_layers: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, base, 3, 1, 1), nn.LeakyReLU(0.2)]
        c, side = base, image_size
        while side > 4:
            layers += [nn.Conv2d(c, min(c * 2, base * 8), 4, 2, 1), nn.GroupNorm(8, min(c * 2, base * 8)), nn.LeakyReLU(0.2)]
            c, side = min(c * 2, base * 8), side // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.heads = nn.Linear(c * 16, n_layers * code_dim)
        self.n_layers, self.code_dim = n_layers, code_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.features(x)).view(len(x), self.n_layers, self.code_dim)


class StyleAutoencoder(nn.Module):
    def __init__(self, image_size: int, code_dim: int, base: int) -> None:
        super().__init__()
        self.image_size, self.n_layers, self.code_dim = image_size, n_codes(image_size), code_dim
        self.encoder = StyleEncoder(image_size, code_dim, base, self.n_layers)
        self.decoder = StyleDecoder(image_size, code_dim, base)

    @property
    def latent_dim(self) -> int:
        """d+ = L * code_dim, the flattened W+ code."""
        return self.n_layers * self.code_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1] [B, 3, S, S] -> flattened W+ latents [B, d+]."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return self.encoder(x).flatten(1)

    def decode(self, w: torch.Tensor) -> torch.Tensor:
        """flattened W+ latents [B, d+] -> images in [-1, 1]."""
        return self.decoder(w.view(len(w), self.n_layers, self.code_dim))


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, codes: torch.Tensor, lambda_delta: float) -> torch.Tensor:
    """L1 + MSE between images, plus e4e's delta regulariser on the layer codes [B, L, d]."""
    delta = (codes - codes.mean(1, keepdim=True)).pow(2).sum(-1).mean()
    return (recon - x).abs().mean() + (recon - x).pow(2).mean() + lambda_delta * delta
