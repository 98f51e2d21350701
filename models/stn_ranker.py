"""stn_ranker — "End-to-End Localization and Ranking for Relative Attributes", K. K. Singh and
Y. J. Lee, ECCV 2016 (papers/stn_ranker.txt; authors' Torch7 code: see REFERENCE_NOTES.md).

A Siamese network scores both images of a pair with shared weights. Each branch is
* a spatial transformer (models/stn.py): a localiser (AlexNet pool5 -> 1x1 conv -> FC -> heads)
  predicts (s, tx, ty) and Eq. 1 warps the image with theta = [[s, 0, s*tx], [0, s, s*ty]]
  (scale through the fixed multiplier `scale_ratio`; initial scale `init_scale`);
* a ranker: AlexNet up to fc7 applied to the crop and, in the combined model, to the global image
  with the SAME weights; v = w_crop . f(crop) + w_global . f(image) (the paper's Linear(8192, 1)
  split into its two halves, Xavier init as the authors'; its bias is left out: it cancels in
  v1 - v2, gets no gradient and stays at its initial 0 in the authors' code).
Loss: Eq. 2 RankNet cross-entropy on v1 - v2 (L = 1 more, 0 less, 0.5 similar).

Boundary rule (crop centre outside the image: |s*tx| > 1 or |s*ty| > 1), chosen by the config
field `boundary` (YAML `model: {boundary: loss}` or `--set model.boundary=loss`):
* 'gradient' (DEFAULT, the authors' code): no forward term; in backward the ranking gradient on
  (s, tx, ty) of an outside image is replaced by the gradient of 0.5*s^2*(tx^2 + ty^2), scaled by
  1/N like the mean over the batch's N pairs (the authors divide all gradients by the batch size);
  the ranker still gets the ranking gradient of that pair.
* 'loss' (the paper's Eq. 3-4): mean_i (1-l1)(1-l2) Rank_i + l1 ST(I1_i) + l2 ST(I2_i) with
  ST = (s*tx)^2 + (s*ty)^2 in normalised coordinates; a pair with an outside image contributes no
  ranking gradient at all, and ST reaches only the localiser.

Two-stage schedule (mode='combined'): for steps < stage1_steps the model is the STN-only ranker
(v = w_crop . f(crop); the global branch is not run and w_global stays exactly 0). From step
stage1_steps on, the combined model continues from it: localiser, ranker and w_crop carry over
unchanged and w_global starts at 0, so scores are identical across the switch; optimiser state
carries on. (The authors' code instead copies only the localiser into a fresh combined network
whose ranker restarts from ImageNet AlexNet with a new Xavier scorer; not implemented, it would
reset parameters and optimiser state mid-run.) mode='stn_only' / 'global_only' are the Table 5
ablation rows. Several attributes share the localiser body and the ranker, with per-attribute
localiser outputs and scorers; each pair trains the heads of its own attribute.

Defaults follow the authors' code: SGD lr 1e-3, momentum 0.9, wd 5e-4 (optim section), localiser
at stn_lr_mult 0.1. The paper's "scale at 1/10 of the translation lr" is realised in the code by
the 0.05 multiplier alone, so scale_lr_mult defaults to 1.0 (0.1 = the paper's text on top).
Test time: `tta_crops` = 10 averages 4 corner + centre crops of side tta_crop_frac (227/256 in the
paper, 7/8 here) and their flips; 1 = the centre crop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from models.backbones import ImageNorm, backbone_state, fc7_net, pool5_net
from models.losses import boundary_grad, boundary_loss, outside_mask, ranknet_loss, st_loss
from models.registry import LoaderFactory, Method, ParamGroup, StepInfo, autocast, eval_mode, lazy_figures, unwrap
from models.stn import LOCALISER_DIMS, Localiser, crop_box, make_theta, warp
from shards.format import DatasetMeta, ShardError


@dataclass(frozen=True)
class StnRankerConfig:
    """The `model:` section of stn_ranker."""

    backbone: Literal["alexnet", "small"] = "small"  # small: a CPU-sized CNN for 32..64 px images
    weights: str = ""  # local torchvision AlexNet state_dict file (backbone alexnet); '' = random init
    attributes: tuple[str, ...] = ()  # continuous attributes to rank; () = all of them
    mode: Literal["combined", "stn_only", "global_only"] = "combined"
    stage1_steps: int = 500  # mode=combined: STN-only steps before the combined model (see module doc)
    scale_ratio: float = 0.05  # fixed multiplier on the scale output
    init_scale: float = 0.33  # initial crop scale (half-side in normalised coordinates)
    translation_init_gain: float = 1.0  # translation head ~ U(+-gain/sqrt(fan_in)); 0 = centred start
    boundary: Literal["gradient", "loss"] = "gradient"  # authors' gradient replacement | Eq. 3-4
    stn_lr_mult: float = 0.1  # localiser lr relative to the ranker
    scale_lr_mult: float = 1.0  # scale head lr relative to the translation head
    crop_size: int = 0  # side of the STN crop in px; 0 = the input's side
    dropout: float = 0.5  # ranker fc6/fc7 dropout
    tta_crops: int = 10  # test-time crops: 10 or 1
    tta_crop_frac: float = 0.875  # test crop side / image side (match augment.size / augment.resize)

    def __post_init__(self) -> None:
        if self.tta_crops not in (1, 10):
            raise ValueError(f"tta_crops must be 1 or 10, got {self.tta_crops}")
        if not 0 < self.tta_crop_frac <= 1:
            raise ValueError(f"tta_crop_frac must be in (0, 1], got {self.tta_crop_frac}")
        if self.scale_ratio <= 0 or self.init_scale <= 0:
            raise ValueError("scale_ratio and init_scale must be > 0")
        if min(self.stage1_steps, self.crop_size) < 0 or min(self.stn_lr_mult, self.scale_lr_mult) < 0:
            raise ValueError("stage1_steps, crop_size, stn_lr_mult and scale_lr_mult must be >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ValueError(f"attributes lists a name twice: {list(self.attributes)}")


def _xavier(*shape: int, fan_in: int) -> torch.Tensor:
    """Xavier-uniform rows of a Linear(fan_in, 1) scorer (the authors' init)."""
    bound = math.sqrt(6.0 / (fan_in + 1))
    return torch.empty(*shape).uniform_(-bound, bound)


class StnRanker(nn.Module):
    """Localiser + shared ranker + per-attribute linear scorers. Inputs are uint8 images."""

    def __init__(self, cfg: StnRankerConfig, attributes: tuple[str, ...], meta_index: list[int], n_meta: int) -> None:
        super().__init__()
        self.cfg, self.attributes = cfg, tuple(attributes)
        k = len(self.attributes)
        lut = torch.full((n_meta,), -1, dtype=torch.long)  # dataset attribute index -> model column
        lut[torch.tensor(meta_index, dtype=torch.long)] = torch.arange(k)
        self.register_buffer("lut", lut, persistent=False)
        state = backbone_state(cfg.backbone, cfg.weights)
        self.norm = ImageNorm()
        self.localiser: Localiser | None = None
        if cfg.mode != "global_only":
            reduce, hidden = LOCALISER_DIMS[cfg.backbone]
            self.localiser = Localiser(pool5_net(cfg.backbone, state), reduce, hidden, k, cfg.scale_ratio,
                                       cfg.init_scale, cfg.translation_init_gain)
        self.ranker = fc7_net(cfg.backbone, state, cfg.dropout)  # last: it takes the state's tensors
        d = self.ranker.feature_dim
        fan_in = d if cfg.mode != "combined" else 2 * d
        self.crop_w = nn.Parameter(_xavier(k, d, fan_in=fan_in)) if cfg.mode != "global_only" else None
        self.global_w = None
        if cfg.mode != "stn_only":  # combined: the global half starts at 0 (two-stage rule)
            self.global_w = nn.Parameter(_xavier(k, d, fan_in=fan_in) if cfg.mode == "global_only" else torch.zeros(k, d))

    def forward(self, images: torch.Tensor, cols: torch.Tensor | None = None, stage1: bool = False,
                boundary_weight: float | None = None) -> dict[str, torch.Tensor]:
        """uint8 images [N, 3, H, W] -> score [N, J] and, with an STN, s/tx/ty [N, J], theta [N, J, 2, 3].

        cols: [N] model column of each image (J = 1), or None for every attribute (J = K).
        stage1: skip the global branch (two-stage schedule). boundary_weight: apply the authors'
        gradient replacement with this weight (None = off).
        """
        x = self.norm(images)
        n, k = x.shape[0], len(self.attributes)
        idx = cols.view(n, 1) if cols is not None else torch.arange(k, device=x.device).expand(n, k)
        j = idx.shape[1]
        pdt = next(self.ranker.parameters()).dtype  # bf16 when a wrapper converted the weights
        out: dict[str, torch.Tensor] = {}
        inputs = []
        if self.localiser is not None:
            s, tx, ty = self.localiser(x.to(pdt))
            if cols is not None:
                s, tx, ty = s.gather(1, idx), tx.gather(1, idx), ty.gather(1, idx)
            if boundary_weight is not None:
                s, tx, ty = boundary_grad(s, tx, ty, boundary_weight)
            theta = make_theta(s.flatten(), tx.flatten(), ty.flatten())
            size = self.cfg.crop_size or min(x.shape[-2:])
            inputs.append(warp(x.repeat_interleave(j, 0), theta, size))
            out.update(s=s, tx=tx, ty=ty, theta=theta.view(n, j, 2, 3))
        use_global = self.global_w is not None and not stage1
        if use_global:
            inputs.append(x)
        if len(inputs) == 2 and inputs[0].shape[-2:] == inputs[1].shape[-2:]:  # one ranker pass
            f = self.ranker(torch.cat(inputs).to(pdt)).float()
            feats = [f[:n * j], f[n * j:]]
        else:
            feats = [self.ranker(t.to(pdt)).float() for t in inputs]
        score = x.new_zeros(n, j)
        if self.localiser is not None:
            score = score + (feats[0].view(n, j, -1) * self.crop_w.float()[idx]).sum(-1)
        if use_global:
            score = score + (feats[-1][:, None] * self.global_w.float()[idx]).sum(-1)
        out["score"] = score
        return out


def _unwrap(model: nn.Module) -> StnRanker:
    return unwrap(model, StnRanker)


def build(cfg: StnRankerConfig, meta: DatasetMeta) -> StnRanker:
    cont = [a.name for a in meta.attributes if a.kind == "continuous"]
    if not cont:
        raise ShardError(f"dataset {meta.name!r} has no continuous attribute; stn_ranker ranks continuous "
                         f"attributes (it has {[f'{a.name}({a.kind})' for a in meta.attributes]})")
    for name in cfg.attributes:
        if name not in cont:
            what = "is not an attribute" if name not in meta.attribute_names else f"is {meta.attribute(name).kind}, not continuous"
            raise ShardError(f"model.attributes: {name!r} {what} in dataset {meta.name!r}; rankable attributes: {cont}")
    names = tuple(cfg.attributes) or tuple(cont)
    return StnRanker(cfg, names, [meta.attribute_names.index(n) for n in names], len(meta.attributes))


def optim_groups(model: nn.Module, cfg: StnRankerConfig) -> dict[str, list[ParamGroup]]:
    """ranker (x1), stn (localiser body), stn_scale, stn_translation; STN groups absent for global_only."""
    m = _unwrap(model)
    ranker = [*m.ranker.parameters(), *(p for p in (m.crop_w, m.global_w) if p is not None)]
    groups = [("ranker", ranker, 1.0)]
    if m.localiser is not None:
        loc = m.localiser
        groups += [("stn", loc.base_parameters(), cfg.stn_lr_mult),
                   ("stn_scale", list(loc.scale_head.parameters()), cfg.stn_lr_mult * cfg.scale_lr_mult),
                   ("stn_translation", list(loc.translation_head.parameters()), cfg.stn_lr_mult)]
    return {"main": [ParamGroup(name, [p for p in ps if p.requires_grad], mult) for name, ps, mult in groups]}


def _zero_loss(m: StnRanker) -> torch.Tensor:
    """0 with a grad_fn touching every trainable parameter (nothing to learn from this batch)."""
    return torch.stack([p.reshape(-1)[0].float() for p in m.parameters() if p.requires_grad]).sum() * 0.0


def step(model: nn.Module, batch: dict[str, Any], cfg: StnRankerConfig, info: StepInfo) -> dict[str, torch.Tensor]:
    """One Siamese step on a pair batch: {'main': Eq. 2 loss with the boundary rule}."""
    m, dev = _unwrap(model), info.device
    cols = m.lut[batch["attribute"].to(dev)]
    keep = cols >= 0  # pairs of attributes this model does not rank are ignored
    n = int(keep.sum())
    info.logs["train/pairs"] = float(n)
    if n == 0:
        return {"main": _zero_loss(m)}
    ia = batch["image_a"].to(dev, non_blocking=True)[keep]
    ib = batch["image_b"].to(dev, non_blocking=True)[keep]
    label = batch["label"].to(dev).float()[keep]
    cols = cols[keep]
    stage1 = cfg.mode == "combined" and info.step < cfg.stage1_steps
    has_stn = m.localiser is not None
    grad_rule = has_stn and cfg.boundary == "gradient"
    with autocast(info):
        out = model(torch.cat([ia, ib]), cols.repeat(2), stage1=stage1, boundary_weight=1.0 / n if grad_rule else None)
    v = out["score"][:, 0].float()
    v1, v2 = v[:n], v[n:]
    rank = ranknet_loss(v1, v2, label, reduction="none")
    stats: dict[str, torch.Tensor] = {"train/rank_loss": rank.detach().mean()}
    if has_stn:
        s, tx, ty = (out[key][:, 0] for key in ("s", "tx", "ty"))
        outside = outside_mask(s, tx, ty).detach()
        if cfg.boundary == "loss":
            st = st_loss(s, tx, ty)
            loss = boundary_loss(rank, st[:n], st[n:], outside[:n], outside[n:])
        else:
            loss = rank.mean()
        stats.update({"stn/scale_mean": s.detach().mean(), "stn/outside_frac": outside.float().mean(),
                      "stn/centre_abs_mean": torch.cat([s * tx, s * ty]).detach().abs().mean()})
    else:
        loss = rank.mean()
    if stage1 and m.global_w is not None:  # keep the unused half in the graph (DDP); its grad is 0
        loss = loss + 0.0 * m.global_w.sum()
    with torch.no_grad():
        ordered = label != 0.5
        stats["train/ordered"] = ordered.sum().float()
        stats["train/correct"] = (((v1 > v2) == (label > 0.5)) & ordered).sum().float()
    vals = dict(zip(stats, torch.stack(list(stats.values())).tolist()))  # one device sync
    correct, n_ordered = vals.pop("train/correct"), vals.pop("train/ordered")
    if n_ordered:
        vals["train/pair_acc"] = correct / n_ordered
    vals["train/stage"] = 1.0 if stage1 else 2.0 if cfg.mode == "combined" else 0.0
    info.logs.update(vals)
    return {"main": loss}


# -- inference -------------------------------------------------------------------------------------

def tta_views(x: torch.Tensor, frac: float, n: int) -> list[torch.Tensor]:
    """n = 1: the centre crop of side frac; n = 10: 4 corners + centre, and their horizontal flips."""
    h, w = x.shape[-2:]
    ch, cw = max(1, round(frac * h)), max(1, round(frac * w))
    centre = x[..., (h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw]
    if n == 1:
        return [centre]
    if n != 10:
        raise ShardError(f"tta must be 1 or 10, got {n}")
    views = [x[..., :ch, :cw], x[..., :ch, w - cw:], x[..., h - ch:, :cw], x[..., h - ch:, w - cw:], centre]
    return views + [v.flip(-1) for v in views]


@torch.no_grad()
def locate(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """STN crop boxes [B, K, 4] (x0, y0, x1, y1 in [0, 1]) of full uint8 images; the full image without STN."""
    m = _unwrap(model)
    dev = m.lut.device
    b, k = images.shape[0], len(m.attributes)
    if m.localiser is None:
        return torch.tensor([0.0, 0.0, 1.0, 1.0], device=dev).expand(b, k, 4).clone()
    with eval_mode(m):
        x = m.norm(images.to(dev))
        s, tx, ty = m.localiser(x.to(next(m.localiser.parameters()).dtype))
    return crop_box(make_theta(s, tx, ty))


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, tta: int | None = None) -> dict[str, torch.Tensor]:
    """Scores [B, K] (mean over `tta` views, default cfg.tta_crops) and STN boxes [B, K, 4] of the
    un-augmented full images. `images`: uint8 [B, 3, H, W], full (resized, uncropped) images."""
    m = _unwrap(model)
    images = images.to(m.lut.device)
    with eval_mode(m):
        views = tta_views(images, m.cfg.tta_crop_frac, m.cfg.tta_crops if tta is None else tta)
        score = torch.stack([m(v.contiguous())["score"] for v in views]).mean(0)
    return {"score": score, "box": locate(m, images)}


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loaders: LoaderFactory, cfg: StnRankerConfig, meta: DatasetMeta) -> dict[str, float]:
    """rank_acc (mean over attributes of ordered-pair accuracy, ties wrong, similar pairs excluded),
    rank_acc/<attr>, rank_pairs; stn_hit (mean over attributes of the fraction of images whose
    crop centre lies in the attribute's ground-truth box, over images with that box), stn_hit/<attr>,
    stn_cover (the converse: the box centre lies inside the crop; a thin region such as the eyes
    can be inside the crop while the crop centre misses it) — the stn_* keys only when boxes exist.

    Every image of the split is scored once (with test-time crops) and located once; the split's
    ordered pairs (loaders.pairs(), from pairs.tsv) are then compared by key, so an image in many
    pairs costs one forward pass."""
    m = _unwrap(model)
    k = len(m.attributes)
    cols = [meta.attribute_names.index(n) for n in m.attributes]
    score: dict[str, torch.Tensor] = {}
    hits, covers, count = torch.zeros(k), torch.zeros(k), torch.zeros(k)
    for batch in loaders("__eval__", kind="samples", full_image=True):
        out = predict(m, batch["image"], cfg.tta_crops)
        for key, sc in zip(batch["key"], out["score"].float().cpu()):
            score[key] = sc
        gt = batch["boxes"][:, cols].float()  # [B, K, 4], NaN = no box
        valid = ~torch.isnan(gt).any(-1)
        box = out["box"].float().cpu()
        cx, cy = (box[..., 0] + box[..., 2]) / 2, (box[..., 1] + box[..., 3]) / 2
        hit = (gt[..., 0] <= cx) & (cx <= gt[..., 2]) & (gt[..., 1] <= cy) & (cy <= gt[..., 3])
        hits += (hit & valid).sum(0)
        gx, gy = (gt[..., 0] + gt[..., 2]) / 2, (gt[..., 1] + gt[..., 3]) / 2  # the converse: region centre in the crop
        covers += (((box[..., 0] <= gx) & (gx <= box[..., 2]) & (box[..., 1] <= gy) & (gy <= box[..., 3])) & valid).sum(0)
        count += valid.sum(0)
    col_of = {n: i for i, n in enumerate(m.attributes)}
    correct, total = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for p in loaders.pairs():
        i = col_of.get(p.attribute)
        if i is None or p.relation == "similar" or p.key_i not in score or p.key_j not in score:
            continue  # pairs of unranked attributes; similar pairs are not ranked (REFERENCE_NOTES)
        d = float(score[p.key_i][i] - score[p.key_j][i])
        correct[i] += (d > 0) if p.relation == "more" else (d < 0)
        total[i] += 1
    out_m: dict[str, float] = {}
    accs = []
    for i, name in enumerate(m.attributes):
        if total[i] > 0:
            accs.append(float(correct[i] / total[i]))
            out_m[f"rank_acc/{name}"] = accs[-1]
    out_m["rank_acc"] = sum(accs) / len(accs) if accs else 0.0
    out_m["rank_pairs"] = float(total.sum())
    if m.localiser is not None:
        hit_keys = {f"stn_hit/{n}": float(hits[i] / count[i]) for i, n in enumerate(m.attributes) if count[i] > 0}
        if hit_keys:
            out_m.update(hit_keys, stn_hit=sum(hit_keys.values()) / len(hit_keys))
            cover = [float(covers[i] / count[i]) for i in range(k) if count[i] > 0]
            out_m["stn_cover"] = sum(cover) / len(cover)
    return out_m


@torch.no_grad()
def snapshot(model: nn.Module, loaders: LoaderFactory, cfg: StnRankerConfig, meta: DatasetMeta) -> dict[str, Any]:
    """The evaluated split's full images: keys [N], STN boxes [N, K, 4] and centre-crop scores [N, K]
    (for the crop-distribution figure, the paper's Fig. 4), with the attribute names [K]."""
    import numpy as np

    m = _unwrap(model)
    keys: list[str] = []
    boxes, scores = [], []
    for batch in loaders("__eval__", kind="samples", full_image=True):
        out = predict(m, batch["image"], tta=1)
        boxes.append(out["box"].float().cpu())
        scores.append(out["score"].float().cpu())
        keys += list(batch["key"])
    k = len(m.attributes)
    return {"keys": np.array(keys, dtype=str), "attributes": np.array(m.attributes, dtype=str),
            "box": torch.cat(boxes).numpy() if boxes else np.zeros((0, k, 4), np.float32),
            "score": torch.cat(scores).numpy() if scores else np.zeros((0, k), np.float32)}


METHOD = Method(
    name="stn_ranker",
    config_cls=StnRankerConfig,
    data_kind="pairs",
    build=build,
    optim_groups=optim_groups,
    step=step,
    evaluate=evaluate,
    val_metric="rank_acc",
    describe="STN localiser + Siamese AlexNet ranker with RankNet loss (Singh & Lee, ECCV 2016)",
    snapshot=snapshot,
    figures=lazy_figures("models.stn_ranker_figures"),
    path_fields=("weights",),
)
