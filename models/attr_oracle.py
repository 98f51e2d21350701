"""attr_oracle — an attribute regressor/classifier trained on real images only, the independent
judge of generated images (trip: papers/trip.txt App. D, "a facial attribute classifier that uses
the ResNet-18 architecture"; later latent_retrieval's attribute adjustment).

A backbone (torchvision ResNet-18, random init or a local weights file, or the small CPU CNN)
with one output per attribute: continuous attributes regress their [0, 1] value through a
sigmoid (MSE), binary ones are logits (BCE). An image's missing attribute (NaN) drops out. It is
trained through the same spine as every method (`attrlab train attr_oracle`), never on
generated images, so a translation model cannot have fitted it. `features` (the pooled backbone
output) feeds the FID-style score (`models/gen_metrics.py`), labelled `fid_oracle` wherever it
is reported because it is not Inception's FID.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import ImageNorm, feature_net
from models.registry import LoaderFactory, Method, ParamGroup, StepInfo, autocast, eval_mode, scalar_attributes, unwrap
from shards.format import DatasetMeta, ShardError


@dataclass(frozen=True)
class AttrOracleConfig:
    """The `model:` section of attr_oracle."""

    backbone: Literal["resnet18", "small"] = "small"
    weights: str = ""  # local torchvision resnet18 state_dict; '' = random init
    attributes: tuple[str, ...] = ()  # () = every continuous and binary attribute of the dataset
    dropout: float = 0.0
    # > 0: every input is resized to this side first (bilinear), in training and when judging
    # generated images; the small CNN's strided stem reads a 32 px face's mouth better at 64
    input_size: int = 0


class AttrOracle(nn.Module):
    def __init__(self, cfg: AttrOracleConfig, names: tuple[str, ...], kinds: tuple[str, ...], cols: list[int]) -> None:
        super().__init__()
        self.cfg, self.attributes, self.kinds = cfg, names, kinds
        self.register_buffer("cols", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.register_buffer("binary", torch.tensor([k == "binary" for k in kinds]), persistent=False)
        self.norm = ImageNorm()
        self.backbone, dim = feature_net(cfg.backbone, cfg.weights)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(dim, len(names)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (or 0..255 float) images [B, 3, H, W] -> features [B, D], logits [B, K], value [B, K] in [0, 1]."""
        x = self.norm(images)
        if self.cfg.input_size and x.shape[-2:] != (self.cfg.input_size, self.cfg.input_size):
            x = F.interpolate(x, size=(self.cfg.input_size,) * 2, mode="bilinear", align_corners=False)
        f = self.backbone(x)
        logits = self.head(f)
        return {"features": f, "logits": logits, "value": torch.sigmoid(logits)}


def _unwrap(model: nn.Module) -> AttrOracle:
    return unwrap(model, AttrOracle)


def build(cfg: AttrOracleConfig, meta: DatasetMeta) -> AttrOracle:
    return AttrOracle(cfg, *scalar_attributes(meta, tuple(cfg.attributes)))


def optim_groups(model: nn.Module, cfg: AttrOracleConfig) -> dict[str, list[ParamGroup]]:
    m = _unwrap(model)
    return {"main": [ParamGroup("backbone", list(m.backbone.parameters())), ParamGroup("head", list(m.head.parameters()))]}


def oracle_loss(logits: torch.Tensor, target: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """Mean over the present (non-NaN) entries of MSE(sigmoid(logit), value) for continuous
    attributes and BCE(logit, value) for binary ones."""
    present = ~torch.isnan(target)
    t = torch.nan_to_num(target.float())
    mse = (torch.sigmoid(logits.float()) - t).pow(2)
    bce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    per = torch.where(binary.view(1, -1), bce, mse) * present
    return per.sum() / present.sum().clamp_min(1)


def step(model: nn.Module, batch: dict[str, Any], cfg: AttrOracleConfig, info: StepInfo) -> dict[str, torch.Tensor]:
    m, dev = _unwrap(model), info.device
    images = batch["image"].to(dev, non_blocking=True)
    target = batch["attributes"].to(dev)[:, m.cols]
    with autocast(info):
        out = model(images)
    loss = oracle_loss(out["logits"], target, m.binary)
    info.logs["train/oracle_loss"] = float(loss.detach())
    return {"main": loss}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{'value': [B, K] in [0, 1] (binary: probability), 'features': [B, D]} in eval mode, on CPU."""
    m = _unwrap(model)
    dev = m.cols.device
    vals, feats = [], []
    with eval_mode(m):
        for chunk in images.split(batch_size):
            out = m(chunk.to(dev))
            vals.append(out["value"].float().cpu())
            feats.append(out["features"].float().cpu())
    return {"value": torch.cat(vals), "features": torch.cat(feats)}


@torch.no_grad()
def evaluate(model: nn.Module, loaders: LoaderFactory, cfg: AttrOracleConfig, meta: DatasetMeta) -> dict[str, float]:
    """mae/<attr> and spearman/<attr> (continuous), acc/<attr> (binary, threshold 0.5), and
    oracle_score = the mean of the Spearman correlations and accuracies (higher is better)."""
    from scipy.stats import spearmanr

    m = _unwrap(model)
    preds, targets = [], []
    for batch in loaders("__eval__", kind="samples"):
        preds.append(predict(m, batch["image"])["value"])
        targets.append(batch["attributes"][:, m.cols.cpu()].float())
    if not preds:
        raise ShardError("attr_oracle: the evaluated split has no images")
    p, t = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    out: dict[str, float] = {}
    scores, maes = [], []
    for i, (name, kind) in enumerate(zip(m.attributes, m.kinds)):
        ok = ~np.isnan(t[:, i])
        if ok.sum() < 2:
            continue
        if kind == "binary":
            out[f"acc/{name}"] = float(((p[ok, i] >= 0.5) == (t[ok, i] >= 0.5)).mean())
            scores.append(out[f"acc/{name}"])
        else:
            out[f"mae/{name}"] = float(np.abs(p[ok, i] - t[ok, i]).mean())
            rho = spearmanr(p[ok, i], t[ok, i]).statistic
            out[f"spearman/{name}"] = float(0.0 if np.isnan(rho) else rho)
            scores.append(out[f"spearman/{name}"])
            maes.append(out[f"mae/{name}"])
    out["oracle_score"] = float(np.mean(scores)) if scores else 0.0
    if maes:
        out["mae"] = float(np.mean(maes))
    return out


METHOD = Method(
    name="attr_oracle",
    config_cls=AttrOracleConfig,
    data_kind="samples",
    build=build,
    optim_groups=optim_groups,
    step=step,
    evaluate=evaluate,
    val_metric="oracle_score",
    describe="attribute regressor/classifier on real images: the independent judge of generated images",
    path_fields=("weights",),
)
