"""Shared image backbones: AlexNet parts in torchvision's layout, and a small CNN for CPU runs.

Every backbone comes in two cuts with one interface:

* `Trunk` (pool5-like): convolutional layers + an adaptive average pool to a fixed
  `out_size` x `out_size` map of `out_channels` channels (AlexNet: 256 x 6 x 6, as torchvision's
  `avgpool`; small: 64 x 3 x 3). Used by localisation networks.
* `Fc7Net` (fc7-like): a trunk + the fully connected layers up to fc7 (ReLU output, dropout as
  torchvision's AlexNet), a `feature_dim` vector (AlexNet: 4096; small: 256). Used by rankers.

AlexNet weights: `torchvision.models.alexnet(weights=None)` (never downloads), optionally filled
from a LOCAL torchvision-format state_dict file (`torch.save(alexnet(weights=...).state_dict(), f)`)
read with `torch.load(weights_only=True)`; a wrong file is a ShardError naming it.
Input normalisation (uint8 -> float, ImageNet mean/std) is `ImageNorm`, a module inside the
model, so it runs on the model's device.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping

import torch
from torch import nn

from shards.format import ShardError

BackboneName = Literal["alexnet", "small"]
BACKBONES: tuple[str, ...] = ("alexnet", "small")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (a generator's tanh range)."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class ImageNorm(nn.Module):
    """uint8 (or 0..255 float) images [B, 3, H, W] -> float32, ImageNet-normalised."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.device, torch.float32) - self.mean) / self.std


class Trunk(nn.Module):
    """Convolutional features up to a fixed-size pool5-like map."""

    def __init__(self, features: nn.Sequential, out_channels: int, out_size: int) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((out_size, out_size))
        self.out_channels, self.out_size = out_channels, out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.features(x))


class Fc7Net(nn.Module):
    """Trunk + fully connected layers up to fc7: [B, 3, H, W] -> [B, feature_dim]."""

    def __init__(self, trunk: Trunk, head: nn.Sequential, feature_dim: int) -> None:
        super().__init__()
        self.trunk, self.head, self.feature_dim = trunk, head, feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.trunk(x), 1))


# -- AlexNet (torchvision layout) ---------------------------------------------------------------

def load_torchvision_state(path: str | Path, arch: str) -> dict[str, torch.Tensor]:
    """Read and check a torchvision `arch` state_dict (alexnet, resnet50, ...) from a local file
    (no network access): weights_only=True, every key and shape must match the definition."""
    import torchvision

    path = Path(path)
    name = {"alexnet": "AlexNet", "resnet50": "ResNet-50", "googlenet": "GoogLeNet"}.get(arch, arch)
    how = f"torch.save(torchvision.models.{arch}(weights=...).state_dict(), path)"
    if not path.is_file():
        raise ShardError(f"{path}: {name} weights file not found (model.weights must be a local "
                         f"torchvision {name} state_dict; nothing is downloaded)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unreadable file is the user's to fix
        raise ShardError(f"{path}: cannot be read as a torch state_dict with weights_only=True ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); save one with {how}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ShardError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(sd).__name__}")
    kwargs = {"aux_logits": False, "init_weights": False} if arch == "googlenet" else {}
    if arch == "googlenet":  # the auxiliary classifiers are training-time heads nobody here uses
        sd = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2."))}
    with torch.device("meta"):  # shapes only, no allocation
        ref = getattr(torchvision.models, arch)(weights=None, **kwargs).state_dict()
    missing = sorted(set(ref) - set(sd))
    unexpected = sorted(set(sd) - set(ref))
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in ref.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        why = "; ".join(p for p in (f"missing {missing[:4]}" if missing else "",
                                    f"unexpected {unexpected[:4]}" if unexpected else "",
                                    f"shape {shapes[:2]}" if shapes else "") if p)
        raise ShardError(f"{path}: not a torchvision {name} state_dict ({why}); save one with {how}")
    return dict(sd)


def load_alexnet_state(path: str | Path) -> dict[str, torch.Tensor]:
    return load_torchvision_state(path, "alexnet")


def _alexnet(state: Mapping[str, torch.Tensor] | None, dropout: float, keep: tuple[str, ...], copy: bool) -> nn.Module:
    """torchvision's AlexNet built on the meta device (no allocation); `_materialise` the parts kept.

    With `state`, the parameters named by the `keep` prefixes become its tensors: copies when
    `copy`, else the state's own tensors (the state must then not be used for another module).
    """
    import torchvision

    with torch.device("meta"):
        net = torchvision.models.alexnet(weights=None, dropout=dropout)
    if state is not None:
        part = {k: v.clone() if copy else v for k, v in state.items() if k.startswith(keep)}
        net.load_state_dict(part, strict=False, assign=True)
    return net


def _materialise(module: nn.Module) -> nn.Module:
    """Meta parameters -> CPU with PyTorch's default init (torchvision's AlexNet uses no other)."""
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
        for sub in module.modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                sub.reset_parameters()
    return module


# -- small CNN for CPU (32..64 px inputs) ---------------------------------------------------------

def _small_features() -> nn.Sequential:
    """AlexNet's layout in miniature for 32..64 px inputs (~12M MACs at 64 px): a strided stem
    keeps full detail for one more layer than an early pool would (small parts such as the eyes
    are a few pixels), BatchNorm because it is trained from scratch (no ImageNet start)."""
    def block(cin: int, cout: int, stride: int = 1, pool: bool = True) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        return layers + ([nn.MaxPool2d(2, ceil_mode=True)] if pool else [])

    return nn.Sequential(*block(3, 16, stride=2, pool=False), *block(16, 32), *block(32, 64), *block(64, 64))


def _check(name: str, weights: str) -> None:
    if name not in BACKBONES:
        raise ShardError(f"backbone {name!r} is not one of {list(BACKBONES)}")
    if weights and name != "alexnet":
        raise ShardError(f"model.weights ({weights!r}) is only for backbone 'alexnet'; "
                         f"backbone {name!r} starts from random weights")


def pool5_net(name: str, state: Mapping[str, torch.Tensor] | None = None) -> Trunk:
    """The pool5-like cut. `state`: a checked AlexNet state_dict (load_alexnet_state) or None;
    its tensors are copied."""
    _check(name, "<state_dict>" if state is not None else "")
    if name == "alexnet":
        return Trunk(_materialise(_alexnet(state, 0.5, ("features.",), copy=True).features), 256, 6)
    return Trunk(_small_features(), 64, 3)


def fc7_net(name: str, state: Mapping[str, torch.Tensor] | None = None, dropout: float = 0.5) -> Fc7Net:
    """The fc7-like cut (dropout before fc6 and fc7, as torchvision's AlexNet). Takes OWNERSHIP of
    `state`'s tensors (no 230 MB copy): build other modules from the state before this one."""
    _check(name, "<state_dict>" if state is not None else "")
    if name == "alexnet":
        net = _alexnet(state, dropout, ("features.", "classifier.1.", "classifier.4."), copy=False)
        return Fc7Net(Trunk(_materialise(net.features), 256, 6), _materialise(net.classifier[:6]), 4096)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(64 * 9, 256), nn.ReLU(inplace=True),
                         nn.Dropout(dropout), nn.Linear(256, 256), nn.ReLU(inplace=True))
    return Fc7Net(Trunk(_small_features(), 64, 3), head, 256)


def backbone_state(name: str, weights: str) -> dict[str, torch.Tensor] | None:
    """The checked local weights for `name` (None when `weights` is empty)."""
    _check(name, weights)
    return load_alexnet_state(weights) if weights else None


# -- embedding trunks (coop_embed, deml, ...) -----------------------------------------------------

EMBED_BACKBONES: dict[str, int] = {"resnet50": 2048, "resnet18": 512, "small": 64}  # name -> pooled feature width


def feature_net(name: str, weights: str = "") -> tuple[nn.Module, int]:
    """A globally pooled feature extractor [B, 3, H, W] -> [B, D] and D.

    resnet50 / resnet18: torchvision's definition without its classifier (random init, or
    `weights`, a local torchvision state_dict of that arch); small: the CPU CNN above + global
    average pool.
    """
    if name not in EMBED_BACKBONES:
        raise ShardError(f"backbone {name!r} is not one of {list(EMBED_BACKBONES)}")
    if name == "small":
        if weights:
            raise ShardError(f"model.weights ({weights!r}) is only for the resnet backbones; 'small' starts from random weights")
        return nn.Sequential(_small_features(), nn.AdaptiveAvgPool2d(1), nn.Flatten()), 64
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights:
        net.load_state_dict(load_torchvision_state(weights, name))
    net.fc = nn.Identity()
    return net, EMBED_BACKBONES[name]


# -- two-part trunks (deml: FNet = up to the channel-attention point, GNet = the rest) ------------

class GNet(nn.Module):
    """The second part of a split trunk: a list of stages run in turn; returns the outputs of the
    stages named in `taps` (the object-attention inputs; the last is the final map)."""

    def __init__(self, stages: nn.ModuleDict, taps: tuple[str, ...]) -> None:
        super().__init__()
        self.stages, self.taps = stages, taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for name, stage in self.stages.items():
            x = stage(x)
            if name in self.taps:
                out.append(x)
        return out


def split_net(name: str, weights: str = "") -> tuple[nn.Module, GNet, int, int]:
    """(FNet, GNet, FNet channels, GNet final channels) for deml.

    googlenet: torchvision's GoogLeNet (init_weights=True, aux_logits=False; or `weights`, a local
    torchvision googlenet state_dict) cut after pool3 (480 channels, where the paper puts the CAMs);
    GNet = inception4a..5b, tapping inception4e (832) and inception5b (1024) for the OAM.
    small: the CPU CNN's stem and first block (32 channels at 1/4 size), then two blocks tapped at
    1/8 (64 channels) and 1/16 (128 channels)."""
    if name == "small":
        if weights:
            raise ShardError(f"model.weights ({weights!r}) is only for backbone 'googlenet'; 'small' starts from random weights")

        def block(cin: int, cout: int, stride: int = 1, pool: bool = True) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2, ceil_mode=True)] if pool else []))

        fnet = nn.Sequential(block(3, 16, stride=2, pool=False), block(16, 32))
        stages = nn.ModuleDict({"mid": block(32, 64), "top": block(64, 128)})
        return fnet, GNet(stages, ("mid", "top")), 32, 128
    if name != "googlenet":
        raise ShardError(f"backbone {name!r} is not one of ['googlenet', 'small']")
    import torchvision

    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    if weights:
        net.load_state_dict(load_torchvision_state(weights, "googlenet"))
    fnet = nn.Sequential(net.conv1, net.maxpool1, net.conv2, net.conv3, net.maxpool2, net.inception3a,
                         net.inception3b, net.maxpool3)
    stages = nn.ModuleDict({k: getattr(net, k) for k in ("inception4a", "inception4b", "inception4c", "inception4d",
                                                          "inception4e", "maxpool4", "inception5a", "inception5b")})
    return fnet, GNet(stages, ("inception4e", "inception5b")), 480, 1024
