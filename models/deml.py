"""deml — "Hybrid-Attention based Decoupled Metric Learning for Zero-Shot Image Retrieval",
B. Chen and W. Deng, CVPR 2019 (papers/deml.txt; REFERENCE_NOTES.md for the authors' code).

The holistic embedding (Eq. 1) is the concatenation of I x J channel-attention (CA) learners,
each L2-normalised, d / (I J) dimensions each (floor). Scale i (an object-attention (OA) root
learner) runs FNet^i, J CAMs in parallel (Sec. 3.2), the GNet^i shared by its J branches (the
attended maps concatenated on the batch axis, as the authors' code) and one FC learner per
branch. Between scales the parameter-free OAM (Sec. 3.1, Eq. 2-3; models/deml_attention.py) turns
scale i's conv maps (averaged over the J branches) into a crop box, and the crop, zoomed to the
input size, is scale i+1's input. Backbones: GoogLeNet (torchvision, cut after pool3) or the
small CPU CNN; one per scale (or shared: `share_backbone`). U-baseline: I = J = 1, `cam: none`.

Loss:  L = 1/(IJ) sum_ij L_bd(CA_ij)                                (Eq. 5, binomial deviance)
         + lambda_1/(2IJN) sum_ijn ||CA_ij(x_n)||^2 + lambda_2 sum_ij tr[(w w^T - I) (.) (.)]  (Eq. 6)
         + diversity:  'adversary' lambda_0 sum_i sum_jj' ||F^i(z_ij) - F^i(z_ij')||^2  (Eq. 4)
                       through a gradient reversal layer (F^i minimises, everything else maximises),
                       'hinge' the authors' contrastive constraint, or 'none'.
z = the L2-normalised learner outputs. The activation decay reaches only the learner FCs, as the
authors' code (`act_decay_into_trunk` to let it reach the trunk). Learners (and CAMs, adversaries)
take 10x the learning rate (param groups).

Evaluation: Recall@K (K = `recall_ks`) with cosine similarity on the holistic embedding,
leave-one-out on the evaluated split (zero-shot test classes), or `query_split` -> the evaluated
split (In-Shop); per-scale OA R@1 (Table 2 'O'), per-learner R@1 and 'sim', the mean cosine
similarity between the CA learners of a scale (Table 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import ImageNorm, split_net
from models.deml_attention import Adversary, ChannelAttention, attention_map, crop_and_zoom, crop_boxes
from models.losses import (activation_decay, binomial_deviance_loss, grad_reverse, learner_contrastive_hinge,
                           nontrivial_term, pairwise_discrepancy)
from models.registry import LoaderFactory, Method, ParamGroup, StepInfo, autocast, eval_mode, lazy_figures, unwrap
from shards.format import DatasetMeta, ShardError


@dataclass(frozen=True)
class DemlConfig:
    """The `model:` section of deml."""

    backbone: Literal["googlenet", "small"] = "small"
    weights: str = ""  # local torchvision googlenet state_dict (backbone googlenet); '' = random init
    scales: int = 2  # I: object-attention root learners
    learners: int = 2  # J: channel-attention sub-learners per scale
    dim: int = 128  # d: the holistic embedding size (each learner d // (I J))
    share_backbone: bool = False  # one FNet/GNet for every scale (the paper: one per scale)
    cam: Literal["se", "spatial", "none"] = "se"  # 'none' = no CAM (the U-baseline; needs learners: 1)
    cam_hidden: int = 64
    diversity: Literal["adversary", "hinge", "none"] = "adversary"
    adversary: Literal["orthogonal", "linear", "mlp"] = "orthogonal"  # F^i (deml_attention.Adversary)
    adversary_dim: int = 0  # F^i's output size; 0 = half the learner size
    lambda_adv: float = 1.0  # lambda_0 (Eq. 4)
    lambda_hinge: float = 0.2  # diversity 'hinge' (the authors' code)
    hinge_margin: float = 2.0
    lambda_act: float = 0.014  # lambda_1 (Eq. 6)
    lambda_ntri: float = 0.25  # lambda_2 (Eq. 6)
    act_decay_into_trunk: bool = False
    alpha: float = 2.0  # Eq. 5
    beta: float = 0.5
    neg_cost: float = 35.0  # C
    oam_steps: int = 10  # T (Eq. 3)
    oam_maps: Literal["both", "mid", "top"] = "both"  # GoogLeNet: inception4e / inception5b
    oam_sigma: float = 0.0  # the authors' spatial Gaussian on the edges (0.15); 0 = Eq. 2 alone
    oam_min_frac: float = 0.25  # smallest crop side as a fraction of the input side; >= 1: no crop (ablation)
    label: Literal["auto", "category", "instance"] = "auto"  # auto: the dataset's retrieval_label
    query_split: str = ""  # '' = leave-one-out on the evaluated split; else queries from this split
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    curve_splits: tuple[str, ...] = ("train", "test")  # R@1 recorded at each validation (Fig. 5)
    curve_images: int = 1000  # images per curve split (the first ones)

    def __post_init__(self) -> None:
        if self.scales < 1 or self.learners < 1:
            raise ValueError("model.scales and model.learners must be >= 1")
        if self.dim // (self.scales * self.learners) < 1:
            raise ValueError(f"model.dim {self.dim} leaves no dimension for {self.scales} x {self.learners} learners")
        if self.cam == "none" and self.learners != 1:
            raise ValueError("model.cam 'none' (the U-baseline) needs model.learners: 1; the J learners of a "
                             "scale differ only through their CAMs")
        if not self.oam_min_frac >= 0:
            raise ValueError(f"model.oam_min_frac must be >= 0 (a fraction of the input side; >= 1: no crop), "
                             f"got {self.oam_min_frac}")
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError("model.recall_ks must list positive K")


class ScaleOut(NamedTuple):
    embs: list[torch.Tensor]  # J learner outputs [B, d_j] (not normalised)
    decay_embs: list[torch.Tensor]  # the same, or from detached features (activation decay)
    taps: list[torch.Tensor]  # OAM inputs: conv maps averaged over the J branches (detached)
    cam_weights: list[torch.Tensor]  # J x [B, C] channel weights (empty without CAMs)
    inputs: torch.Tensor  # this scale's (normalised) input images


class Scale(nn.Module):
    """One OA root learner: FNet, J CAMs, the shared GNet, J learner FCs (+ the adversary F^i)."""

    def __init__(self, cfg: DemlConfig, trunk: tuple[nn.Module, nn.Module, int, int], dim_j: int) -> None:
        super().__init__()
        self.fnet, self.gnet, fch, gch = trunk
        j = cfg.learners
        self.cams = nn.ModuleList([ChannelAttention(fch, cfg.cam_hidden, cfg.cam) for _ in range(j)]
                                  if cfg.cam != "none" else [])
        self.learners = nn.ModuleList([nn.Linear(gch, dim_j) for _ in range(j)])
        self.adversary = (Adversary(dim_j, cfg.adversary_dim or max(1, dim_j // 2), cfg.adversary)
                          if cfg.diversity == "adversary" and j > 1 else None)
        self.decay_into_trunk = cfg.act_decay_into_trunk

    def forward(self, x: torch.Tensor) -> ScaleOut:
        f = self.fnet(x)
        j, b = len(self.learners), x.shape[0]
        weights: list[torch.Tensor] = []
        if len(self.cams):
            caps = []
            for cam in self.cams:
                cap, w = cam(f)
                caps.append(cap)
                weights.append(w)
            f = torch.cat(caps, 0)  # the J proposals through the one GNet in one pass
        taps = self.gnet(f)
        pooled = taps[-1].mean((2, 3)).float().view(j, b, -1)
        embs = [lin(pooled[k].to(lin.weight.dtype)).float() for k, lin in enumerate(self.learners)]
        decay = embs if self.decay_into_trunk else [
            lin(pooled[k].detach().to(lin.weight.dtype)).float() for k, lin in enumerate(self.learners)]
        means = [t.detach().float().view(j, b, *t.shape[1:]).mean(0) for t in taps]
        return ScaleOut(embs, decay, means, weights, x)


class Deml(nn.Module):
    """forward(uint8 images) -> the holistic embedding [B, I J d_j] (L2-normalised parts);
    forward(images, train=True) -> the list of ScaleOut (one per scale)."""

    def __init__(self, cfg: DemlConfig, label_field: str) -> None:
        super().__init__()
        self.cfg, self.label_field = cfg, label_field
        self.norm = ImageNorm()
        self.dim_j = cfg.dim // (cfg.scales * cfg.learners)
        shared = split_net(cfg.backbone, cfg.weights) if cfg.share_backbone else None
        self.scales = nn.ModuleList([Scale(cfg, shared or split_net(cfg.backbone, cfg.weights), self.dim_j)
                                     for _ in range(cfg.scales)])
        self.embedding_dim = cfg.scales * cfg.learners * self.dim_j

    def next_input(self, out: ScaleOut) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """OAM: (attention map [B, H, W], crop boxes [B, 4], the cropped & zoomed next input)."""
        taps = {"both": out.taps, "mid": out.taps[:1], "top": out.taps[-1:]}[self.cfg.oam_maps]
        size = (out.inputs.shape[-2], out.inputs.shape[-1])
        att = attention_map(taps, size, self.cfg.oam_steps, self.cfg.oam_sigma)
        boxes = crop_boxes(att, self.cfg.oam_min_frac)
        return att, boxes, crop_and_zoom(out.inputs, boxes).to(out.inputs.dtype)

    def run(self, images: torch.Tensor) -> list[ScaleOut]:
        x = self.norm(images)
        outs: list[ScaleOut] = []
        for i, scale in enumerate(self.scales):
            outs.append(scale(x))
            if i + 1 < len(self.scales):
                x = self.next_input(outs[-1])[2]
        return outs

    def forward(self, images: torch.Tensor, train: bool = False) -> Any:
        outs = self.run(images)
        if train:
            return outs
        return torch.cat([F.normalize(e, dim=1) for o in outs for e in o.embs], 1)

    def learner_slices(self) -> list[list[slice]]:
        """[scale][learner] -> the learner's columns in the holistic embedding."""
        w, j = self.dim_j, self.cfg.learners
        return [[slice((i * j + k) * w, (i * j + k + 1) * w) for k in range(j)] for i in range(self.cfg.scales)]


def _unwrap(model: nn.Module) -> Deml:
    return unwrap(model, Deml)


def label_field(cfg: DemlConfig, meta: DatasetMeta) -> str:
    field_ = cfg.label if cfg.label != "auto" else str(meta.extra.get("retrieval_label", "category"))
    if field_ not in ("category", "instance"):
        raise ShardError(f"dataset {meta.name!r}: retrieval_label {field_!r} is not 'category' or 'instance'; "
                         "set model.label")
    return field_


def build(cfg: DemlConfig, meta: DatasetMeta) -> Deml:
    return Deml(cfg, label_field(cfg, meta))


def optim_groups(model: nn.Module, cfg: DemlConfig) -> dict[str, list[ParamGroup]]:
    """Sec. 4: the learners (and the new CAMs and adversaries) at 10x the backbone's rate."""
    m = _unwrap(model)
    trunk = {id(p): p for s in m.scales for p in [*s.fnet.parameters(), *s.gnet.parameters()]}
    learners = [p for s in m.scales for p in s.learners.parameters()]
    cams = [p for s in m.scales for p in s.cams.parameters()]
    adv = [p for s in m.scales if s.adversary is not None for p in s.adversary.parameters()]
    groups = [ParamGroup("backbone", list(trunk.values()), 1.0), ParamGroup("learners", learners, 10.0),
              ParamGroup("cams", cams, 10.0), ParamGroup("adversary", adv, 10.0, weight_decay=0.0)]
    return {"main": [g for g in groups if g.params]}


def batch_labels(batch: dict[str, Any], field_: str, device: torch.device) -> torch.Tensor:
    if field_ == "category":
        return batch["category"].to(device).long()
    _, inverse = np.unique(np.asarray(batch["instance"], dtype=str), return_inverse=True)
    return torch.as_tensor(inverse, dtype=torch.long, device=device)


def learner_similarity(embs: list[torch.Tensor]) -> torch.Tensor:
    """Per image, the mean cosine similarity over the learner pairs j < j' of one scale [B]."""
    z = torch.stack([F.normalize(e.float(), dim=1) for e in embs], 1)
    s = z @ z.transpose(1, 2)
    j = len(embs)
    upper = torch.triu(torch.ones(j, j, dtype=torch.bool, device=z.device), diagonal=1)
    return s[:, upper].mean(1)


def deml_loss(m: Deml, outs: list[ScaleOut], labels: torch.Tensor, cfg: DemlConfig,
              terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 4-6; fills `terms` with the parts (weighted as they enter the loss)."""
    embs = [e for o in outs for e in o.embs]
    terms["metric"] = torch.stack([binomial_deviance_loss(e, labels, cfg.alpha, cfg.beta, cfg.neg_cost)
                                   for e in embs]).mean()
    terms["act"] = cfg.lambda_act * torch.stack([activation_decay(e) for o in outs for e in o.decay_embs]).mean()
    terms["ntri"] = cfg.lambda_ntri * sum(nontrivial_term(lin.weight) for s in m.scales for lin in s.learners)
    loss = terms["metric"] + terms["act"] + terms["ntri"]
    if cfg.learners > 1 and cfg.diversity != "none":
        div = []
        for scale, o in zip(m.scales, outs):
            if cfg.diversity == "adversary":
                assert scale.adversary is not None
                div.append(cfg.lambda_adv * pairwise_discrepancy(
                    [scale.adversary(grad_reverse(F.normalize(e, dim=1))) for e in o.embs]))
            else:
                div.append(cfg.lambda_hinge * learner_contrastive_hinge(o.embs, cfg.hinge_margin))
        terms[cfg.diversity] = torch.stack(div).sum()
        loss = loss + terms[cfg.diversity]
    return loss


def step(model: nn.Module, batch: dict[str, Any], cfg: DemlConfig, info: StepInfo) -> dict[str, torch.Tensor]:
    m, dev = _unwrap(model), info.device
    with autocast(info):
        outs = model(batch["image"].to(dev, non_blocking=True), train=True)
    terms: dict[str, torch.Tensor] = {}
    loss = deml_loss(m, outs, batch_labels(batch, m.label_field, dev), cfg, terms)
    info.logs.update({f"train/{k}": float(v.detach()) for k, v in terms.items()})
    if cfg.learners > 1:
        info.logs["train/sim"] = float(torch.stack([learner_similarity([e.detach() for e in o.embs]) for o in outs]).mean())
    return {"main": loss}


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def embed_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> holistic embeddings [B, D] (float32, eval mode)."""
    with eval_mode(_unwrap(model)) as m:
        return m(images.to(m.norm.mean.device)).float()


def retrieval_metrics(m: Deml, gallery: dict[str, Any], query: dict[str, Any] | None,
                      ks: tuple[int, ...]) -> dict[str, float]:
    """r@K of the holistic embedding, oa{i}_r@1 per scale, ca{i}.{j}_r@1 per learner, sim / sim_std."""
    from models.retrieval import knn_recall_at_k

    g_emb = np.asarray(gallery["emb"], np.float32)
    g_raw = np.asarray(gallery[m.label_field]).astype(str)
    if query is not None:
        q_emb, q_raw = np.asarray(query["emb"], np.float32), np.asarray(query[m.label_field]).astype(str)
        vocab = {s: i for i, s in enumerate(sorted(set(g_raw) | set(q_raw)))}
        q_lab, g_lab = np.array([vocab[s] for s in q_raw]), np.array([vocab[s] for s in g_raw])
        excl = None
    else:
        q_emb, g_lab = g_emb, np.unique(g_raw, return_inverse=True)[1]
        q_lab, excl = g_lab, np.arange(len(g_lab))

    def recall(cols: slice, k: tuple[int, ...]) -> dict[str, float]:
        return knn_recall_at_k(q_emb[:, cols], q_lab, g_emb[:, cols], g_lab, ks=k, exclude_self=excl)

    out = {f"r@{k.split('@')[1]}": v for k, v in recall(slice(None), ks).items()}
    slices = m.learner_slices()
    for i, row in enumerate(slices, 1):
        if len(slices) > 1:
            out[f"oa{i}_r@1"] = recall(slice(row[0].start, row[-1].stop), (1,))["recall@1"]
        if len(row) > 1 or len(slices) > 1:
            for j, s in enumerate(row, 1):
                out[f"ca{i}.{j}_r@1"] = recall(s, (1,))["recall@1"]
    if m.cfg.learners > 1:
        emb = torch.from_numpy(g_emb)
        sims = torch.stack([learner_similarity([emb[:, s] for s in row]) for row in slices]).mean(0)
        out["sim"], out["sim_std"] = float(sims.mean()), float(sims.std())
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loaders: LoaderFactory, cfg: DemlConfig, meta: DatasetMeta) -> dict[str, float]:
    m = _unwrap(model)
    gallery = loaders.embed("__eval__", m)  # in-process, or on Ray workers (jobs/embed.py)
    query = loaders.embed(cfg.query_split, m) if cfg.query_split and cfg.query_split != loaders.split else None
    return retrieval_metrics(m, gallery, query, tuple(cfg.recall_ks))


@torch.no_grad()
def embed_first(model: nn.Module, loader: Any, limit: int, field_: str) -> tuple[np.ndarray, np.ndarray]:
    """The holistic embeddings and label ids of a loader's first `limit` images."""
    embs, labs, n = [], [], 0
    for batch in loader:
        embs.append(embed_images(model, batch["image"]).cpu().numpy())
        labs.append(np.asarray(batch[field_] if field_ == "instance" else batch[field_].numpy()).astype(str))
        n += len(embs[-1])
        if n >= limit:
            break
    lab = np.concatenate(labs)[:limit]
    return np.concatenate(embs)[:limit], np.unique(lab, return_inverse=True)[1]


def snapshot(model: nn.Module, loaders: LoaderFactory, cfg: DemlConfig, meta: DatasetMeta) -> dict[str, Any]:
    """Fig. 5: R@1 (leave-one-out) on the first `curve_images` of each curve split (seen = train,
    unseen = test) at every validation."""
    from models.retrieval import knn_recall_at_k

    m = _unwrap(model)
    out: dict[str, Any] = {}
    for split in cfg.curve_splits:
        if split not in meta.splits:
            continue
        emb, lab = embed_first(m, loaders(split), cfg.curve_images, m.label_field)
        r = knn_recall_at_k(emb, lab, emb, lab, ks=(1,), exclude_self=np.arange(len(lab)))
        out[f"{split}_r@1"] = np.float32(r["recall@1"])
    return out


METHOD = Method(
    name="deml",
    config_cls=DemlConfig,
    data_kind="class_balanced",
    build=build,
    optim_groups=optim_groups,
    step=step,
    evaluate=evaluate,
    val_metric="r@1",
    describe="hybrid-attention decoupled metric learning for zero-shot retrieval (Chen & Deng 2019)",
    snapshot=snapshot,
    figures=lazy_figures("models.deml_figures"),
    embed=embed_images,
    path_fields=("weights",),
)
